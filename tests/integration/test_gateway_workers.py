"""The gateway with two worker processes on one port (LTREC_WORKERS=2, `server.workers`) in front
of the real tritonserver: requests succeed whichever worker a connection reaches, both workers
serve, the one metrics port adds up both workers' counters, and SIGTERM drains both."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.gen.ltrec.v1 import recommender_pb2_grpc
from tests.support.stack import (  # noqa: F401  (fixture `stack`)
    Stack,
    _request,
    metric_value,
    started_stack,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKERS = 2
# Connections, each its own (not gRPC's shared subchannel): the kernel spreads connections over
# the workers, so 16 of them all reaching one worker has probability 2**-15.
CONNECTIONS = 16
CALLS_PER_CONNECTION = 3
DRAIN_SECONDS = 3.0


@pytest.fixture(scope="module", name="stack")
def workers_stack(
    tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path
) -> Iterator[Stack]:
    env = {"LTREC_WORKERS": str(WORKERS), "LTREC_SHUTDOWN_DRAIN_SECONDS": str(DRAIN_SECONDS)}
    with started_stack(tmp_path_factory.mktemp("workers"), triton_build_dir, env) as stack:
        yield stack


def _worker_pids(supervisor: int) -> set[int]:
    """The supervisor's spawned workers (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    }


def _access_pids(log: Path, method: str, expected_lines: int) -> list[int]:
    """The pid of each access-log line of `method` (the log is written by each worker's thread:
    waits until the lines are there)."""
    deadline = time.monotonic() + 15
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        pids = [
            line["pid"]
            for line in lines
            if line.get("event") == "rpc" and line.get("method") == method
        ]
        if len(pids) >= expected_lines or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


def test_both_workers_serve_and_metrics_add_up(stack: Stack) -> None:
    assert stack.gateway.process is not None
    workers = _worker_pids(stack.gateway.process.pid)
    assert len(workers) == WORKERS
    before = metric_value(
        stack.gateway.metrics_port,
        "ltrec_gateway_requests_total",
        {"method": "Recommend", "code": "OK"},
    )
    sent = 0
    for _ in range(CONNECTIONS):
        with grpc.insecure_channel(
            stack.gateway.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            for _ in range(CALLS_PER_CONNECTION):
                reply = stub.Recommend(_request(stack.history, k=5), timeout=10)
                assert len(reply.items) == 5
                sent += 1
    assert stack.gateway.log_path is not None
    pids = _access_pids(stack.gateway.log_path, "Recommend", sent)
    assert len(pids) == sent
    assert set(pids) == workers  # every worker served, and only workers did

    def metric(sample: str, **labels: str) -> float:
        return metric_value(stack.gateway.metrics_port, sample, labels)

    # One scrape, both workers' counts: the sum of what each worker answered.
    assert metric("ltrec_gateway_requests_total", method="Recommend", code="OK") - before == sent
    assert (
        metric("ltrec_gateway_request_duration_seconds_count", method="Recommend", code="OK")
        >= sent
    )
    assert metric("ltrec_gateway_in_flight_requests") == 0
    assert metric("ltrec_gateway_triton_ready") == 1
    version = stack.metadata["model_version"]
    assert metric("ltrec_gateway_model_info", model_version=version) == 1


def test_sigterm_drains_every_worker(stack: Stack) -> None:
    """Runs last in the module: it stops the gateway."""
    process = stack.gateway.process
    assert process is not None
    workers = _worker_pids(process.pid)
    assert len(workers) == WORKERS
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # Draining: NOT_SERVING, whichever worker answers, and calls are still answered.
    for _ in range(4):
        with grpc.insecure_channel(
            stack.gateway.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            assert len(stub.Recommend(_request(stack.history, k=5), timeout=10).items) == 5
    assert process.wait(timeout=30) == 0
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
