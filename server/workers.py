"""Several gateway processes on one port (`LTREC_WORKERS` > 1): one Python process serves about
one core (the GIL), so a pod with more cores runs more workers.

The process started (`python -m server`) becomes a supervisor. It makes a fresh directory for
prometheus_client's multiprocess mode, serves the metrics of every worker on the one metrics port
(what a ServiceMonitor scrapes: counters and histograms summed over the workers, gauges combined
as `server.metrics` says), and starts the workers (`multiprocessing`, spawn). Each worker is a
whole gateway (`server.app.serve`) with its own Triton channel, health reporter and store
readers, listening on the same gRPC port with SO_REUSEPORT: the kernel spreads connections, not
calls, over the workers.

What a worker writes is its own, as a replica's is: its feedback and item segments are named
`<replica>-w<index>` (the item store's poll shows each worker what the others wrote, as between
pods). The user hash key is shared: the configured one, the SQLite history file's, or (no history
store) one the supervisor makes.

SIGTERM (or SIGINT) to the supervisor: SIGTERM to every worker, each of which runs the gateway's
shutdown (NOT_SERVING, the drain, `server.stop(grace)`, stores and Triton channel closed); the
supervisor waits for them (drain + grace + a margin, then kills what is left) and exits. A worker
that exits on its own takes the others down and the supervisor exits with its code: the
orchestrator restarts the pod, as it would a single-process gateway that died.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from ltrec_core.segment_log import replica_name
from server.config import GatewayConfig
from server.stores.history_sqlite import SqliteHistory

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Beyond the configured drain and grace, how long a worker may take to close its stores.
STOP_MARGIN_SECONDS = 5.0
POLL_SECONDS = 0.2

Worker = Callable[[GatewayConfig], int]


def worker_config(config: GatewayConfig, index: int, user_hash_key: str) -> GatewayConfig:
    """Worker `index`'s configuration: its own replica name, the shared hash key, no metrics
    port (the supervisor serves the metrics)."""
    replica = replica_name(config.feedback_replica)[:60]
    return dataclasses.replace(
        config,
        feedback_replica=f"{replica}-w{index}",
        user_hash_key=user_hash_key,
        metrics_port=0,
    )


def shared_user_hash_key(config: GatewayConfig) -> str:
    """The key every worker hashes user ids with (else each would make its own)."""
    if config.user_hash_key:
        return config.user_hash_key
    if config.history_store == "sqlite":
        history = SqliteHistory(config.history_sqlite_path)
        history.open()  # also makes the schema once, before the workers open the file
        try:
            return history.hash_key()
        finally:
            asyncio.run(history.close())
    return secrets.token_hex(32)


def supervise(config: GatewayConfig, worker: Worker) -> int:
    """Runs `config.workers` processes of `worker` (a top-level function, so that it can be
    pickled, that serves one worker's configuration and returns its exit code) until SIGTERM or
    SIGINT; returns 0 when every worker stopped cleanly after a requested stop, else the code of
    the worker that failed first (1 when it had none)."""
    directory = Path(tempfile.mkdtemp(prefix="ltrec-metrics-"))
    # Inherited by the workers (spawned: they import prometheus_client afresh, in this mode);
    # this process's own metrics stay in memory, unserved.
    configured = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(directory)
    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    context = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = []
    try:
        if config.metrics_port:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
            start_http_server(config.metrics_port, addr=config.grpc_host, registry=registry)
            logger.info("metrics of %d workers on :%d/metrics", config.workers, config.metrics_port)
        key = shared_user_hash_key(config)
        for index in range(config.workers):
            process: BaseProcess = context.Process(
                target=_process_main,
                args=(worker, worker_config(config, index, key)),
                name=f"gateway-worker-{index}",
            )
            process.start()
            processes.append(process)
        logger.info(
            "%d gateway workers on port %d: pids %s",
            config.workers,
            config.grpc_port,
            ", ".join(str(p.pid) for p in processes),
        )
        failed: BaseProcess | None = None
        while not stop_requested and failed is None:
            wait([p.sentinel for p in processes], timeout=POLL_SECONDS)
            failed = next((p for p in processes if p.exitcode is not None), None)
        if failed is not None and not stop_requested:
            logger.error(
                "gateway worker %s (pid %s) exited with code %s: stopping the others",
                failed.name,
                failed.pid,
                failed.exitcode,
            )
        else:
            logger.info("stopping %d gateway workers", len(processes))
        _stop(processes, config.shutdown_drain_seconds + config.shutdown_grace_seconds)
        if failed is not None and not stop_requested:
            return failed.exitcode or 1
        return 0 if all(p.exitcode == 0 for p in processes) else 1
    finally:
        _stop(processes, 0.0)  # only those still running (an exception above)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in processes:
            if process.pid is not None:
                multiprocess.mark_process_dead(process.pid, str(directory))  # type: ignore[no-untyped-call]
        shutil.rmtree(directory, ignore_errors=True)
        if configured is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = configured


def _process_main(worker: Worker, config: GatewayConfig) -> None:
    sys.exit(worker(config))


def _stop(processes: list[BaseProcess], within_seconds: float) -> None:
    """SIGTERM to the running workers, then SIGKILL to those still running after
    `within_seconds` plus the margin."""
    running = [p for p in processes if p.exitcode is None and p.pid is not None]
    for process in running:
        assert process.pid is not None
        os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + within_seconds + STOP_MARGIN_SECONDS
    for process in running:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            logger.error(
                "gateway worker %s (pid %s) did not stop: killed",
                process.name,
                process.pid,
            )
            process.kill()
            process.join()
