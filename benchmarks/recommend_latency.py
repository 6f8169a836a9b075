"""Sequential Recommend latency against a running gateway (concurrency 1).

    python benchmarks/recommend_latency.py [--address 127.0.0.1:50051] [--requests 500] [-k 10]

Histories are real ones from the dataset directory (the last events of random users), so the
history lengths and items are what production would send. Prints p50/p90/p99 and throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc  # noqa: E402


def histories(data_dir: Path, n: int, length: int, seed: int) -> list[list[str]]:
    events = pd.read_parquet(data_dir / "events.parquet", columns=["user_id", "item_id"])
    grouped = events.groupby("user_id", sort=False)["item_id"].apply(list)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(grouped), size=n, replace=True)
    return [grouped.iloc[i][-length:] for i in picks]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--data", type=Path, default=Path("data/ml-1m"))
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--history", type=int, default=50, help="events per request")
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    requests = [
        recommender_pb2.RecommendRequest(
            user_id=f"bench-{i}",
            history=[
                recommender_pb2.HistoryEvent(item_id=item, timestamp=j) for j, item in enumerate(h)
            ],
            context=recommender_pb2.Context(device="mobile", region="zip9"),
            k=args.k,
        )
        for i, h in enumerate(histories(args.data, args.requests + args.warmup, args.history, 0))
    ]
    with grpc.insecure_channel(args.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        for request in requests[: args.warmup]:
            stub.Recommend(request, timeout=10)
        latencies = []
        started = time.perf_counter()
        for request in requests[args.warmup :]:
            t0 = time.perf_counter()
            stub.Recommend(request, timeout=10)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1e3
    print(f"Recommend, concurrency 1, {len(ms)} requests, history {args.history}, k {args.k}")
    print(f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'req/s':>8}")
    print(
        f"{np.percentile(ms, 50):>8.2f} {np.percentile(ms, 90):>8.2f} "
        f"{np.percentile(ms, 99):>8.2f} {ms.max():>8.2f} {len(ms) / elapsed:>8.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
