"""How often items added after training reach a user's top 10: ML-1M's held-out cold items.

    python -m benchmarks.cold_items --data data/ml-1m --out artifacts/ml-1m-cold [--max-minutes 5]

The cold-start split of the evaluation report (`ltrec.evaluation.cold_start_split`: a seeded 10%
of the items with events lose every training and validation event, as if they were added after
training) trains the served model (text + ID items) on the rest. A cold item's row of the
trained table is then exactly what `UpsertItems` puts in the overlay: the trained projection of
its MiniLM text embedding, with no ID vector (an item without training events gets no gradient,
so its ID vector stays at its initial zero; the script checks it) and popularity 0. So the
figures below are what serving gives for such items added through the item store (the
integration test `test_new_items` checks that the served overlay ranks exactly as torch with the
items appended).

Per long-tail weight w (score - w * log(1 + popularity), as served): for the test cases whose
target is a cold item, Recall@10 over the whole catalogue (history excluded, ties against) and
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
import torch

from ltrec.checkpoint import load_checkpoint
from ltrec.evaluation import (
    cold_start_split,
    evaluate,
    evaluate_lists,
    events_in_order,
    long_tail_adjusted,
    make_cases,
    with_split,
)
from ltrec.prepared import prepare
from ltrec.scoring import model_score_fn
from ltrec.train import TrainConfig, train

WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0)
K = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--cache", type=Path, default=Path("artifacts/cache"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/ml-1m-cold"))
    parser.add_argument("--max-minutes", type=float, default=5.0)
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
    model, _ = load_checkpoint(checkpoint)
    assert model.item_ids is not None
    cold_ids = model.item_ids.weight.detach()[torch.from_numpy(np.flatnonzero(cold))]
    id_norm = float(cold_ids.abs().max())
    print(f"cold items: {int(cold.sum())}; largest |ID vector entry| of a cold item: {id_norm}")

    history = events_in_order(split.train, split.valid)
    every = make_cases(history, split.test, warm.device_vocab, warm.region_vocab)
    test = split.test[cold[split.test["item_index"].to_numpy()]].reset_index(drop=True)
    cases = make_cases(history, test, warm.device_vocab, warm.region_vocab)
    score = model_score_fn(model, model.cfg.max_history)
    figures = []
    for weight in WEIGHTS:
        scorer = long_tail_adjusted(score, warm.popularity, weight)
        cold_metrics, _ = evaluate(scorer, cases, ks=(K,), progress=False)
        all_ranks, top = evaluate_lists(scorer, every, k=K, progress=False)
        figures.append(
            {
                "weight": weight,
                "cold_recall@10": cold_metrics[f"recall@{K}"],
                "users_with_a_cold_item_in_top10": float(cold[top].any(axis=1).mean()),
                "all_recall@10": float((all_ranks < K).mean()),
            }
        )
    print(
        f"{len(cases)} test cases with a cold target, {len(every)} test cases; model trained "
        f"{args.max_minutes:g} min on {len(split.train):,} events"
    )
    print("| w | cold-item Recall@10 | users with a cold item in their top 10 | Recall@10 (all) |")
    print("| ---: | ---: | ---: | ---: |")
    for f in figures:
        print(
            f"| {f['weight']:g} | {f['cold_recall@10']:.4f} | "
            f"{f['users_with_a_cold_item_in_top10']:.1%} | {f['all_recall@10']:.4f} |"
        )
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps({"figures": figures, "cold_items": int(cold.sum())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
