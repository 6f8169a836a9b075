"""`LTREC_WORKERS` (`server.workers`): the configuration, each worker's settings, and the
supervisor with fake workers in real spawned processes: metrics summed over the workers on one
port, SIGTERM stopping them all, a failed worker stopping the pod with its code. The real gateway
with two workers in front of Triton: tests/integration/test_gateway_workers.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from server.app import server_options
from server.config import ConfigError, GatewayConfig
from server.workers import MULTIPROC_ENV, shared_user_hash_key, supervise, worker_config
from tests.support.fake_workers import COUNTED, FAILED_CODE, counting_worker, failing_worker
from tests.support.stack import metric_value
from triton_local.server import free_ports

BASE = {"LTREC_ALLOW_PLAINTEXT": "true"}


def config(**env: str) -> GatewayConfig:
    return GatewayConfig.from_env({**BASE, **env})


def test_workers_are_bounded_and_need_a_fixed_port() -> None:
    assert config().workers == 1
    assert config(LTREC_WORKERS="4").workers == 4
    with pytest.raises(ConfigError, match=r"LTREC_WORKERS must be in \[1, 64\], got 0"):
        config(LTREC_WORKERS="0")
    with pytest.raises(ConfigError, match="LTREC_GRPC_PORT must be a fixed port"):
        config(LTREC_WORKERS="2", LTREC_GRPC_PORT="0")


def test_only_several_workers_share_the_port() -> None:
    assert ("grpc.so_reuseport", 1) not in server_options(config())
    assert ("grpc.so_reuseport", 1) in server_options(config(LTREC_WORKERS="2"))


def test_each_worker_is_a_replica_of_its_own_with_the_shared_key() -> None:
    base = config(LTREC_WORKERS="2", LTREC_FEEDBACK_REPLICA="pod-7", LTREC_METRICS_PORT="9100")
    first, second = (worker_config(base, i, "shared") for i in range(2))
    assert (first.feedback_replica, second.feedback_replica) == ("pod-7-w0", "pod-7-w1")
    assert first.user_hash_key == second.user_hash_key == "shared"
    assert first.metrics_port == 0  # the supervisor serves the metrics
    assert first.grpc_port == base.grpc_port


def test_the_shared_key_is_the_configured_one_or_the_history_files(tmp_path: Path) -> None:
    assert shared_user_hash_key(config(LTREC_USER_HASH_KEY="mine")) == "mine"
    path = str(tmp_path / "history.sqlite3")
    kept = shared_user_hash_key(config(LTREC_HISTORY_SQLITE_PATH=path))
    assert kept == shared_user_hash_key(config(LTREC_HISTORY_SQLITE_PATH=path))
    off = config(LTREC_HISTORY_STORE="off")
    assert len(shared_user_hash_key(off)) == 64
    assert shared_user_hash_key(off) != shared_user_hash_key(off)


def test_metrics_are_summed_over_workers_and_sigterm_stops_them_all(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    settings = config(
        LTREC_WORKERS="2",
        LTREC_METRICS_PORT=str(port),
        LTREC_GRPC_HOST="127.0.0.1",
        LTREC_HISTORY_STORE="off",
        LTREC_SHUTDOWN_GRACE_SECONDS="1",
    )
    seen: list[float] = []

    def scrape_then_stop() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                value = metric_value(port, "fake_requests_total")
            except OSError:
                value = 0.0
            if value >= 2 * COUNTED:
                seen.append(value)
                break
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by supervise (main thread)

    scraper = threading.Thread(target=scrape_then_stop)
    scraper.start()
    assert supervise(settings, counting_worker) == 0
    scraper.join()
    assert seen == [2 * COUNTED]  # both workers' counts, on the one port
    assert MULTIPROC_ENV not in os.environ


def test_a_failed_worker_stops_the_others_with_its_code() -> None:
    settings = config(LTREC_WORKERS="2", LTREC_METRICS_PORT="0", LTREC_HISTORY_STORE="off")
    started = time.monotonic()
    assert supervise(settings, failing_worker) == FAILED_CODE
    assert time.monotonic() - started < 30
