"""`make soak`: the real local stack (Triton + gateway) under steady mixed traffic for N minutes,
to show that nothing grows without bound: resident memory and open file descriptors of the
gateway and Triton (process trees, `/proc`), and the sizes of the stores, at start and end.

    python -m benchmarks.soak --model-repository model_repository --minutes 30 --rate 20

Traffic, at a steady `--rate` calls a second from one client thread: 70% Recommend (a random
trained history), 25% Feedback, 5% UpsertItems (a new item each). The item store compacts at a
low threshold and, every `--retrain-every-minutes`, a simulated retraining records what it read
of the feedback store (`ltrec_core.feedback_log.record_consumed`, what `ltrec.retrain merge`
does) so retention (`--retention-seconds`) can retire segments during the run. Prints one
Markdown table; not a test, and not in CI.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from benchmarks.procstat import process_tree, read_pids
from ltrec_core import feedback_log
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from triton_local import TritonServer
from triton_local.stack import GatewayProcess

VIEW = recommender_pb2.EVENT_TYPE_VIEW


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def metric(url: str, name: str, label: str = "") -> float:
    """The sum of a metric's samples on the gateway's /metrics page (those with `label`)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{") and label in line
    )


def reading(gateway: GatewayProcess, triton_pid: int, stores: Path) -> dict[str, float]:
    assert gateway.process is not None
    gw, tr = process_tree(gateway.process.pid), process_tree(triton_pid)
    return {
        "gateway RSS (MiB)": read_pids(gw).rss_mib,
        "Triton RSS (MiB, all processes)": read_pids(tr).rss_mib,
        "gateway open fds": open_fds(gw),
        "Triton open fds": open_fds(tr),
        "feedback store (KiB)": directory_bytes(stores / "feedback") / 1024,
        "feedback segments": len(feedback_log.segments(stores / "feedback")),
        "item store (KiB)": directory_bytes(stores / "items") / 1024,
        "item store files": len([p for p in (stores / "items").glob("items*")]),
        "history store (KiB)": directory_bytes(stores / "history") / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0, help="calls a second")
    parser.add_argument("--retrain-every-minutes", type=float, default=5.0)
    parser.add_argument("--retention-seconds", type=int, default=60)
    args = parser.parse_args(argv)
    catalogue = (args.model_repository / "ltrec_catalogue.csv").read_text().splitlines()[1:]
    item_ids = [line.split(",")[1] for line in catalogue]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="ltrec-soak-") as tmp:
        stores = Path(tmp)
        with TritonServer(args.model_repository, log_path=stores / "triton.log") as triton:
            gateway = GatewayProcess(
                args.model_repository.resolve(),
                triton.grpc_url,
                log_path=stores / "gateway.log",
                feedback_dir=stores / "feedback",
                items_dir=stores / "items",
                history_path=stores / "history" / "history.sqlite3",
                env={
                    "LTREC_FEEDBACK_MAX_SEGMENT_BYTES": str(256 * 1024),
                    "LTREC_FEEDBACK_RETENTION_SECONDS": str(args.retention_seconds),
                    "LTREC_ITEMS_MAX_SEGMENT_BYTES": str(256 * 1024),
                    "LTREC_ITEMS_COMPACT_TAIL_RECORDS": "50",
                    "LTREC_ITEMS_MAX_OVERLAY": "100000",
                },
            )
            gateway.start()
            try:
                try:
                    gateway.wait_serving()
                except RuntimeError:
                    print((stores / "gateway.log").read_text()[-3000:])
                    raise
                assert triton._process is not None
                summary = run(args, gateway, triton._process.pid, stores, item_ids, rng)
            finally:
                gateway.stop()
    print(summary)
    return 0


def run(
    args: argparse.Namespace,
    gateway: GatewayProcess,
    triton_pid: int,
    stores: Path,
    item_ids: list[str],
    rng: random.Random,
) -> str:
    metrics_url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    counts = {"Recommend": 0, "Feedback": 0, "UpsertItems": 0}
    failures: dict[str, int] = {}
    with grpc.insecure_channel(gateway.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        call(stub, "Recommend", item_ids, rng, 0)  # warm up before the first reading
        start = reading(gateway, triton_pid, stores)
        began = time.monotonic()
        end = began + args.minutes * 60
        next_retrain = began + args.retrain_every_minutes * 60
        n = 0
        while (now := time.monotonic()) < end:
            n += 1
            method = rng.choices(["Recommend", "Feedback", "UpsertItems"], [70, 25, 5])[0]
            try:
                call(stub, method, item_ids, rng, n)
                counts[method] += 1
            except grpc.RpcError as exc:
                key = f"{method} {exc.code().name}"
                failures[key] = failures.get(key, 0) + 1
            if now >= next_retrain:
                consumed: dict[str, int] = {}
                for _ in feedback_log.read_records(stores / "feedback", consumed=consumed):
                    pass
                feedback_log.record_consumed(stores / "feedback", consumed)
                next_retrain += args.retrain_every_minutes * 60
            time.sleep(max(0.0, began + n / args.rate - time.monotonic()))
        finish = reading(gateway, triton_pid, stores)
        elapsed = time.monotonic() - began
        compactions = metric(
            metrics_url, "ltrec_gateway_item_store_compactions_total", 'result="ok"'
        )
        retired = metric(metrics_url, "ltrec_gateway_feedback_segments_retired_total")
    lines = [
        f"Soak: {elapsed / 60:.1f} min at {sum(counts.values()) / elapsed:.1f} calls/s "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}; failed: {failures or 0}); "
        f"{compactions:.0f} item store compactions, {retired:.0f} feedback segments retired.",
        "",
        "| | start | end |",
        "|---|---|---|",
    ]
    for key, value in start.items():
        lines.append(f"| {key} | {value:,.0f} | {finish[key]:,.0f} |")
    return "\n".join(lines)


def call(
    stub: recommender_pb2_grpc.RecommenderStub,
    method: str,
    item_ids: list[str],
    rng: random.Random,
    n: int,
) -> None:
    user = f"soak-user-{n % 500}"
    if method == "Recommend":
        history = [
            recommender_pb2.HistoryEvent(item_id=i, event_type=VIEW)
            for i in rng.sample(item_ids, 5)
        ]
        stub.Recommend(
            recommender_pb2.RecommendRequest(k=10, user_id=user, history=history), timeout=10
        )
    elif method == "Feedback":
        event = recommender_pb2.FeedbackEvent(
            request_id=f"soak-{n}",
            user_id=user,
            item_id=rng.choice(item_ids),
            type=recommender_pb2.FEEDBACK_TYPE_CLICK,
            position=n % 10,
        )
        stub.Feedback(recommender_pb2.FeedbackRequest(event=event), timeout=10)
    else:
        item = recommender_pb2.Item(
            item_id=f"soak-item-{n % 2000}",
            title=f"Soak item {n} (2031)",
            description="A film added during the soak run.",
            category="Drama",
        )
        stub.UpsertItems(
            recommender_pb2.UpsertItemsRequest(items=[item], request_id=f"soak-up-{n}"),
            timeout=30,
        )


if __name__ == "__main__":
    raise SystemExit(main())
