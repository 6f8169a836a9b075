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
from pathlib import Path

from tests.support.datasets import write_tiny_data
from tests.support.ddp import torchrun


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
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_tiny_data(root / "data", n_users=args.users, cache_dir=root / "cache")
        train_args = [
            "--data", str(data), "--cache", str(root / "cache"), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--patience", str(args.epochs),
            "--max-minutes", "60", "--embedding-dim", "16", "--layers", "1", "--heads", "2",
            "--max-history", "20", "--dropout", str(args.dropout), "--no-progress",
        ]  # fmt: skip
        rows = []
        for processes in args.processes:
            out = root / f"out-{processes}"
            started = time.monotonic()
            torchrun([*train_args, "--out", str(out)], processes)
            wall = time.monotonic() - started
            summary = json.loads((out / "metrics.json").read_text())
            rows.append((processes, wall, summary))
    print(f"tiny dataset: {args.users} users, {args.epochs} epochs, batch {args.batch_size} users")
    header = ("processes", "wall s", "train s", "final NDCG@10", "best NDCG@10")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (9, 8, 8, 14, 13), strict=True)))
    for processes, wall, summary in rows:
        final = summary["epochs"][-1].get("ndcg@10", float("nan"))
        print(
            f"{processes:>9} {wall:>8.1f} {summary['train_seconds']:>8.1f} {final:>14.4f} "
            f"{summary['best']['ndcg@10']:>13.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
