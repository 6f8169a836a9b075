"""How often items added after training reach a user's top 10: ML-1M's held-out cold items.

    python -m benchmarks.cold_items --data data/ml-1m --out artifacts/ml-1m-cold --max-minutes 17

The cold-start split of the evaluation report (`ltrec.evaluation.cold_start_split`: a seeded 10%
of the items with events lose every training and validation event, as if they were added after
training) trains the served model (text + ID items) on the rest. A cold item's row of the
trained table is then what `UpsertItems` gives an item added through the item store: the trained
projection of its MiniLM text embedding, plus the ID vector predicted from that content vector
(`ltrec.new_item_ids`: an item without training events gets no gradient, so without the
prediction its ID vector stays at its initial zero), and popularity 0. The integration test
`test_new_items` checks that the served overlay ranks exactly as torch with the items appended.
Each figure is printed for the model as trained and, as an ablation, for the same model with the
cold items' ID vectors set back to zero.

Per long-tail weight w (score - w * log(1 + popularity), as served; the default is the one
training chose on validation): for the test cases whose target is a cold item, Recall@10 over
the whole catalogue (history excluded, ties against) and
the share of users with at least one cold item in their top 10; and Recall@10 of all test cases,
for the cost. Prints a table; `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ltrec.checkpoint import load_checkpoint
from ltrec.evaluation import (
    cold_start_split,
    evaluate,
    evaluate_lists,
    events_in_order,
    long_tail_adjusted,
    make_cases,
    ranking_metrics,
    with_split,
)
from ltrec.new_item_ids import as_added_items, with_plain_map, without_new_item_ids
from ltrec.prepared import prepare
from ltrec.scoring import model_score_fn
from ltrec.train import TrainConfig, train

WEIGHTS = (0.0, 0.1, 0.25, 0.5)
K = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--cache", type=Path, default=Path("artifacts/cache"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/ml-1m-cold"))
    parser.add_argument("--max-minutes", type=float, default=17.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.monotonic()

    prepared = prepare(args.data, args.cache)
    n_items = len(prepared.item_ids)
    split, cold = cold_start_split(prepared.split, n_items, 0.1, args.seed)
    warm = with_split(prepared, split)
    checkpoint = args.out / "checkpoint.pt"
    if not checkpoint.is_file():
        config = TrainConfig(max_minutes=args.max_minutes, seed=args.seed)
        train(warm, config, args.out, progress=False)
    model, ckpt = load_checkpoint(checkpoint)
    assert model.item_ids is not None
    # The cold items stand for products added after training: the vectors UpsertItems gives
    # them (a catalogue item without events gets the best boost without a shift).
    as_added_items(model, np.flatnonzero(cold))
    imputed = ckpt.summary.get("new_item_ids") or {"applied": False}
    print(
        f"cold items: {int(cold.sum())}; their ID vectors predicted from content "
        f"(ltrec.new_item_ids): {imputed.get('applied')}"
        + (
            f", ridge lambda {imputed['ridge_lambda']:g}, items weighed by popularity^"
            f"{imputed.get('popularity_exponent', 0.0):g} (chosen by "
            f"{imputed.get('chosen_by', 'cross-validated R^2')}), cross-validated R^2 "
            f"{max(imputed['cv_r2'].values()):.3f}, scaled by {imputed.get('scale', 1.0):g} "
            f"and shifted by {imputed.get('shift', 0.0):g} along the mean user (the boost with "
            "the best new-item NDCG@10 within 2% of the plain map's validation NDCG@10)"
            if imputed.get("applied")
            else ""
        )
    )

    history = events_in_order(split.train, split.valid)
    every = make_cases(history, split.test, warm.device_vocab, warm.region_vocab)
    test = split.test[cold[split.test["item_index"].to_numpy()]].reset_index(drop=True)
    cases = make_cases(history, test, warm.device_vocab, warm.region_vocab)
    default = float(ckpt.summary["long_tail_weight"]["chosen"])
    variants = {"as trained": model}
    if imputed.get("applied"):  # the ablation: the same model with zero ID vectors for them
        variants["without predicted ID vectors"] = without_new_item_ids(model, warm.popularity)
        offset = model.fusion.new_item_offset
        if model.fusion.new_item_scale != 1.0 or (offset is not None and offset.any()):
            # and with the plain ridge prediction (no scale, no shift)
            variants["plain map (scale 1, no shift)"] = with_plain_map(model, warm.popularity)
    figures = []
    for variant, m in variants.items():
        score = model_score_fn(m, m.cfg.max_history)
        for weight in sorted({*WEIGHTS, default}):
            scorer = long_tail_adjusted(score, ckpt.long_tail_counts, weight)
            cold_metrics, _ = evaluate(scorer, cases, ks=(K,), progress=False)
            all_ranks, top = evaluate_lists(scorer, every, k=K, progress=False)
            all_metrics = ranking_metrics(all_ranks, ks=(K,))
            figures.append(
                {
                    "variant": variant,
                    "weight": weight,
                    "default": weight == default,
                    "cold_recall@10": cold_metrics[f"recall@{K}"],
                    "users_with_a_cold_item_in_top10": float(cold[top].any(axis=1).mean()),
                    "all_recall@10": all_metrics[f"recall@{K}"],
                    "all_ndcg@10": all_metrics[f"ndcg@{K}"],
                }
            )
    summary = ckpt.summary
    print(
        f"{len(cases)} test cases with a cold target, {len(every)} test cases; model trained "
        f"{summary['train_seconds'] / 60:.1f} min ({len(summary['epochs'])} epochs) on "
        f"{len(split.train):,} events; default weight {default:g} (chosen on validation)"
    )
    print(
        "| variant | w | cold-item Recall@10 | users with a cold item in their top 10 "
        "| Recall@10 (all) | NDCG@10 (all) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for f in figures:
        mark = " (default)" if f["default"] else ""
        print(
            f"| {f['variant']} | {f['weight']:g}{mark} | {f['cold_recall@10']:.4f} | "
            f"{f['users_with_a_cold_item_in_top10']:.1%} | {f['all_recall@10']:.4f} | "
            f"{f['all_ndcg@10']:.4f} |"
        )
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps({"figures": figures, "cold_items": int(cold.sum())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
