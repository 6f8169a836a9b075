"""Where the gateway's milliseconds go: `Recommend` at concurrency 1 against the real stack while
py-spy samples the gateway process, then the share of the gateway's CPU samples in each part of
the request path (collapsed stacks, matched by frame).

    python -m benchmarks.gateway_profile [--repo build/bench/model_repository] [--requests 2000]

Needs `py-spy` (requirements/dev.txt) and ptrace rights on the gateway (same user). Samples only
the thread holding the GIL (`--gil`): the Python time the gateway spends, whichever thread. Frames
of compiled code (grpc's Cython core) show as the Python frame that called them, which is why
the event loop's callback frame (`asyncio/events.py:_run`) carries grpc's own work. Writes the
collapsed stacks to build/profile/gateway.folded (feed them to a flame graph viewer).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks import clients
from benchmarks.processes import serving_stack
from benchmarks.workload import build_workload
from server.gen.ltrec.v1 import recommender_pb2

# (part of the request path, frames that mark it: "file.py:function" substrings), first match
# from the leaf wins, so specific parts come before the frames that contain them.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("access log (logging, JSON)", ("logging/", "pythonjsonlogger", "server/logs.py")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("tracing (opentelemetry)", ("opentelemetry", "server/tracing.py")),
    ("tritonclient request/response", ("tritonclient",)),
    ("validation", ("server/validation.py",)),
    ("features", ("server/features.py", "server/item_filter.py")),
    ("postprocess", ("server/postprocess.py",)),
    ("history", ("server/history.py", "server/stores/history")),
    ("feedback store offer", ("server/stores/feedback.py", "ltrec_core/records.py")),
    ("interceptors", ("server/interceptors.py", "server/access.py")),
    ("servicer (rest)", ("server/servicer.py",)),
    ("grpc aio (server and channel, Cython)", ("grpc/_cython", "grpc/aio", "grpc/_")),
    ("asyncio event loop", ("asyncio/", "uvloop")),
)


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, marks in PARTS:
            if any(mark in frame for mark in marks):
                return name
    return "other"


def summarise(folded: Path) -> list[tuple[str, int]]:
    counts: Counter[str] = Counter()
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[part_of(stack)] += int(n)
    return counts.most_common()


async def _load(
    address: str, requests: list[recommender_pb2.RecommendRequest], seconds: list[float]
) -> None:
    started = time.perf_counter()
    run = await clients.recommend(address, requests, 1, warmup=50)
    seconds.append(time.perf_counter() - started)
    print(
        f"Recommend c=1: p50 {run.summary.p50_ms:.2f} ms, p99 {run.summary.p99_ms:.2f} ms, "
        f"{run.summary.throughput_rps:.0f} req/s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path("build/bench/model_repository"))
    parser.add_argument("--events", type=Path, default=Path("data/ml-1m/events.parquet"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("build/profile"))
    parser.add_argument("--rate", type=int, default=2000, help="samples per second")
    parser.add_argument(
        "--nonblocking",
        action="store_true",
        help="sample without pausing the gateway (less slowdown, at a low rate the same shares)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rate <= 10_000:
        parser.error(f"--rate must be in [1, 10000] samples per second, got {args.rate}")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    workload = build_workload(args.repo, args.requests, events_path=args.events)
    folded = args.out / "gateway.folded"
    with serving_stack(args.repo, args.out / "logs") as stack:
        # warm-up outside the profile
        asyncio.run(clients.recommend(stack.gateway.address, workload.requests[:200], 1))
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(stack.gateway_pid), "--rate", str(args.rate)]
            + ["--format", "raw", "--output", str(folded), "--gil"]
            + (["--nonblocking"] if args.nonblocking else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        seconds: list[float] = []
        asyncio.run(_load(stack.gateway.address, workload.requests, seconds))
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
        if spy.returncode not in (0, None) and not folded.exists():
            print(err.decode(), file=sys.stderr)
            return 1
    parts = summarise(folded)
    total = sum(n for _, n in parts) or 1
    per_request_ms = 1e3 * seconds[0] / args.requests
    print(f"gateway CPU samples by part (rate {args.rate}/s; {per_request_ms:.2f} ms per request):")
    for name, n in parts:
        share = n / args.rate * 1e3 / args.requests
        print(f"  {name:40} {100 * n / total:5.1f} %  ~{share:.3f} ms/req")
    return 0


if __name__ == "__main__":
    sys.exit(main())
