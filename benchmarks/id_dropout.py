"""What ID dropout trades: accuracy on known items against new items, on ML-1M's cold-start split.

    python -m benchmarks.id_dropout --values 0 0.3 0.6 --epochs 2

The served model adds a trained ID vector to each item's content vector (text, attributes,
photo). A new item has no ID vector, so it is scored by a content vector that training never had
to use on its own. `ModelConfig.id_dropout` leaves a random share of the ID vectors out of each
training step, so the content path learns to place items by itself. This script trains the
served model (text + ID items) on the report's cold-start split (a seeded 10% of the items with
events lose every training and validation event) once per value, with the same budget and seed,
and prints per value: validation NDCG@10 (early stopping's figure), test NDCG@10 over every test
case, and Recall@10 / NDCG@10 on the test cases whose target is a held-out item (full ranking,
history excluded, long-tail weight 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments.report.fitting import FACTORIES
from experiments.report.settings import COLD_SHARE
from ltrec import neural_baselines
from ltrec.evaluation import cold_start_split, evaluate, held_out_cases, with_split
from ltrec.prepared import prepare
from ltrec.scoring import model_score_fn
from ltrec.train import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--cache", type=Path, default=Path("artifacts/cache"))
    parser.add_argument("--values", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not all(0.0 <= v < 1.0 for v in args.values):
        parser.error("--values: each must be in [0, 1)")

    prepared = prepare(args.data, args.cache)
    split, cold = cold_start_split(prepared.split, len(prepared.item_ids), COLD_SHARE, args.seed)
    warm = with_split(prepared, split)
    cold_cases = held_out_cases(warm, targets=cold)
    every = held_out_cases(warm)
    rows = []
    for value in args.values:
        started = time.monotonic()
        cfg = TrainConfig(
            epochs=args.epochs,
            max_minutes=args.max_minutes,
            seed=args.seed,
            model={"id_dropout": value},
        )
        model, summary = neural_baselines.fit_recommender(
            warm, cfg, FACTORIES["ours"], name=f"id_dropout {value:g}", progress=False
        )
        score = model_score_fn(model, model.cfg.max_history)
        on_cold, _ = evaluate(score, cold_cases, ks=(10,), progress=False)
        on_all, _ = evaluate(score, every, ks=(10,), progress=False)
        rows.append(
            (
                value,
                len(summary["epochs"]),
                summary["best"]["ndcg@10"],
                on_all["ndcg@10"],
                on_cold["recall@10"],
                on_cold["ndcg@10"],
                time.monotonic() - started,
            )
        )
    print(
        f"\n{int(cold.sum())} held-out items, {len(cold_cases)} test cases with one as target, "
        f"{len(every)} test cases"
    )
    print(
        "| id_dropout | epochs | valid NDCG@10 | test NDCG@10 (all) | held-out Recall@10 "
        "| held-out NDCG@10 | seconds |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for value, epochs, valid, test, recall, ndcg, seconds in rows:
        print(
            f"| {value:g} | {epochs} | {valid:.4f} | {test:.4f} | {recall:.4f} | {ndcg:.4f} "
            f"| {seconds:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
