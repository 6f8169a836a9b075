"""One process against `torchrun --nproc_per_node N` on the tiny synthetic dataset: wall time
and validation NDCG@10 side by side, at the same global batch and seed.

    python -m benchmarks.ddp --processes 1 2

The dataset is the tests' tiny synthetic catalogue (`tests.support.datasets.write_tiny_data`,
stand-in text features, no MiniLM), written to a temporary directory. Wall time includes each
launch (imports, process group); `train s` is rank 0's training loop alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.datasets import write_tiny_data
from tests.support.ddp import torchrun


def compare(
    processes: Sequence[int] = (1, 2),
    *,
    users: int = 200,
    epochs: int = 6,
    batch_size: int = 32,
    dropout: float = 0.0,
) -> list[dict[str, Any]]:
    """Trains on the tiny dataset once per entry of `processes` (1: one process under torchrun
    too) and returns a row each: processes, wall and training seconds, final and best validation
    NDCG@10."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_tiny_data(root / "data", n_users=users, cache_dir=root / "cache")
        train_args = [
            "--data", str(data), "--cache", str(root / "cache"), "--epochs", str(epochs),
            "--batch-size", str(batch_size), "--patience", str(epochs),
            "--max-minutes", "60", "--embedding-dim", "16", "--layers", "1", "--heads", "2",
            "--max-history", "20", "--dropout", str(dropout), "--no-progress",
        ]  # fmt: skip
        rows = []
        for n in processes:
            out = root / f"out-{n}"
            started = time.monotonic()
            torchrun([*train_args, "--out", str(out)], n)
            wall = time.monotonic() - started
            summary = json.loads((out / "metrics.json").read_text())
            rows.append(
                {
                    "processes": n,
                    "wall_s": wall,
                    "train_s": summary["train_seconds"],
                    "final_ndcg": summary["epochs"][-1].get("ndcg@10", float("nan")),
                    "best_ndcg": summary["best"]["ndcg@10"],
                    "users": users,
                    "epochs": epochs,
                    "batch_size": batch_size,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args(argv)
    if min(args.processes) < 1:
        parser.error(f"--processes must be at least 1, got {min(args.processes)}")
    for name, value, low in (("users", args.users, 10), ("epochs", args.epochs, 1)):
        if value < low:
            parser.error(f"--{name} must be at least {low}, got {value}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    rows = compare(
        args.processes,
        users=args.users,
        epochs=args.epochs,
        batch_size=args.batch_size,
        dropout=args.dropout,
    )
    print(f"tiny dataset: {args.users} users, {args.epochs} epochs, batch {args.batch_size} users")
    header = ("processes", "wall s", "train s", "final NDCG@10", "best NDCG@10")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (9, 8, 8, 14, 13), strict=True)))
    for row in rows:
        print(
            f"{row['processes']:>9} {row['wall_s']:>8.1f} {row['train_s']:>8.1f} "
            f"{row['final_ndcg']:>14.4f} {row['best_ndcg']:>13.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
