"""Faults and load with the real tritonserver: Triton dies mid-load and comes back; bounded load.

One tiny model (ML-1M slice, real MiniLM item encoder) is exported once for the module; Triton and
the gateway run as separate processes, as in production.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from export_scripts.export import export
from ltrec_core.feedback_log import read_records
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.support.tiny_model import ml1m_slice, train_tiny
from triton_local.server import TritonServer
from triton_local.stack import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEADLINE_S = 2.0
SERVICE = "ltrec.v1.Recommender"


@dataclass
class Stack:
    triton: TritonServer
    gateway: GatewayProcess
    history: list[str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("faults")
    prepared, users = ml1m_slice(root, n_users=60)
    checkpoint = train_tiny(prepared, root / "artifacts")
    repo = root / "model_repository"
    export(checkpoint, repo, log=lambda _m: None)
    events = prepared.split.train
    history = events[events["user_id"] == users.iloc[0]]["item_id"].tolist()[-20:]
    triton = TritonServer(repo, build_dir=triton_build_dir, log_path=root / "triton.log")
    triton.start()
    gateway = GatewayProcess(
        repo,
        triton.grpc_url,  # its ports are chosen by start()
        log_path=root / "gateway.log",
        env={
            "LTREC_HEALTH_POLL_INTERVAL_SECONDS": "0.2",
            "LTREC_TRITON_TIMEOUT_SECONDS": "1.0",
        },
    )
    try:
        triton.wait_ready(timeout_s=180)
        gateway.start()
        gateway.wait_serving(timeout_s=120)
        yield Stack(triton, gateway, history)
    finally:
        gateway.stop()
        triton.stop()


def request(history: list[str], n: int) -> recommender_pb2.RecommendRequest:
    return recommender_pb2.RecommendRequest(
        user_id=f"load-user-{n % 97}",
        history=[
            recommender_pb2.HistoryEvent(item_id=i, event_type=recommender_pb2.EVENT_TYPE_VIEW)
            for i in history[: 5 + n % 15]
        ],
        k=10,
    )


@dataclass
class Outcome:
    started: float
    seconds: float
    code: grpc.StatusCode


@dataclass
class Load:
    """Closed-loop clients, each on its own channel, recording every call's outcome."""

    address: str
    history: list[str]
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for c in range(self.clients):
            thread = threading.Thread(target=self._run, args=(c,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        return self.outcomes

    def _run(self, c: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            n = c
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    stub.Recommend(request(self.history, n), timeout=DEADLINE_S)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                self.outcomes.append(Outcome(started, time.monotonic() - started, code))
                n += self.clients
                if code is not grpc.StatusCode.OK:
                    time.sleep(0.05)  # a caller backs off a little after an error


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=1.0
            )
        except grpc.RpcError:
            return -1
        return reply.status


def wait_for(predicate, timeout_s: float) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - started


def test_example_client_recommends_and_reports_feedback_that_is_stored(stack: Stack) -> None:
    """`make client CLIENT_ARGS="--click 1"`: a list, then impressions and a click on disk."""
    result = subprocess.run(
        [sys.executable, "examples/recommend_client.py", "--address", stack.gateway.address]
        + ["-k", "5", "--click", "1"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "feedback: 6 events stored (impressions, click on #1)" in result.stdout
    records = list(read_records(stack.gateway.feedback_dir))
    (served,) = [r for r in records if r["kind"] == "served" and r["user_id"] == "example-user"]
    feedback = [r for r in records if r["kind"] == "feedback" and r["user_id"] == "example-user"]
    assert [r["type"] for r in feedback] == ["impression"] * 5 + ["click"]
    assert {r["request_id"] for r in feedback} == {served["request_id"]}
    assert [r["item_id"] for r in feedback[:5]] == served["items"]
    assert feedback[-1]["item_id"] == served["items"][0]


def test_triton_dies_and_comes_back_without_restarting_the_gateway(stack: Stack) -> None:
    gateway_pid = stack.gateway.process.pid  # type: ignore[union-attr]
    load = Load(stack.gateway.address, stack.history, clients=4)
    load.start()
    time.sleep(2.0)
    # A hard fault: tritonserver and its backend stubs killed at once.
    killed_at = time.monotonic()
    os.killpg(stack.triton.pid, signal.SIGKILL)  # type: ignore[arg-type]
    stack.triton.stop()
    not_serving_after = wait_for(
        lambda: health_status(stack.gateway.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
        timeout_s=5,
    )
    time.sleep(2.0)  # callers keep calling during the outage
    restarted_at = time.monotonic()
    stack.triton.start()  # same ports
    stack.triton.wait_ready(timeout_s=180)
    ready_at = time.monotonic()
    serving_after = wait_for(
        lambda: health_status(stack.gateway.address) == health_pb2.HealthCheckResponse.SERVING,
        timeout_s=10,
    )
    first_ok_after = wait_for(
        lambda: any(o.code is grpc.StatusCode.OK and o.started >= ready_at for o in load.outcomes),
        timeout_s=10,
    )
    time.sleep(1.0)
    outcomes = load.stop()

    assert stack.gateway.process.pid == gateway_pid and stack.gateway.process.poll() is None  # type: ignore[union-attr]
    before = [o for o in outcomes if o.started + o.seconds < killed_at]
    outage = [
        o for o in outcomes if killed_at <= o.started and o.started + o.seconds < restarted_at
    ]
    after = [o for o in outcomes if o.started >= ready_at + serving_after]
    assert before and all(o.code is grpc.StatusCode.OK for o in before)
    assert outage, "no call was made while Triton was down"
    # Down: UNAVAILABLE, well within the caller's deadline (no hanging until it runs out).
    assert {o.code for o in outage} == {grpc.StatusCode.UNAVAILABLE}
    assert max(o.seconds for o in outage) < DEADLINE_S
    # Back: the gateway found Triton again by itself.
    assert after and all(o.code is grpc.StatusCode.OK for o in after)
    print(
        f"\nTriton fault: NOT_SERVING {not_serving_after:.2f} s after the kill; "
        f"{len(outage)} calls during the outage, all UNAVAILABLE, "
        f"p50 {statistics.median(o.seconds for o in outage) * 1000:.1f} ms, "
        f"max {max(o.seconds for o in outage) * 1000:.1f} ms; Triton restart to ready "
        f"{ready_at - restarted_at:.1f} s; gateway SERVING {serving_after:.2f} s and first OK "
        f"{first_ok_after:.2f} s after Triton was ready"
    )


def test_bounded_load_has_no_unexpected_errors(stack: Stack) -> None:
    """20,000 Recommend calls from 64 concurrent callers: every one OK (a figure, not a timing)."""
    total, concurrency = 20_000, 64

    async def run() -> tuple[list[float], list[grpc.StatusCode], float]:
        latencies: list[float] = []
        failures: list[grpc.StatusCode] = []
        counter = iter(range(total))
        async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)

            async def caller() -> None:
                for n in counter:
                    started = time.perf_counter()
                    try:
                        await stub.Recommend(request(stack.history, n), timeout=30)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc.code())
                        continue
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return latencies, failures, time.perf_counter() - started

    latencies, failures, elapsed = asyncio.run(run())
    assert not failures, f"{len(failures)} failed: {set(failures)}"
    assert len(latencies) == total
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    print(
        f"\nload: {total} Recommend calls at concurrency {concurrency}: 0 errors, "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {total / elapsed:.0f} req/s ({elapsed:.1f} s)"
    )
