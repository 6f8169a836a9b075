"""What the benchmark runs on: a checkpoint (the trained one, or a tiny one in quick mode), its
export, and the serving processes, each started on free ports and stopped by its own pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from triton_local.server import TritonServer, free_ports
from triton_local.stack import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent


def tiny_checkpoint(workdir: Path) -> Path:
    """The integration tests' tiny model (a MovieLens-1M slice, one epoch, 16-d): what the quick
    mode runs on when no trained checkpoint exists. Its figures describe a smaller model."""
    from tests.support.tiny_model import ml1m_slice, train_tiny

    out = workdir / "tiny"
    checkpoint = out / "artifacts" / "checkpoint.pt"
    if not checkpoint.is_file():
        prepared, _ = ml1m_slice(out)
        train_tiny(prepared, checkpoint.parent)
    return checkpoint


@dataclass
class Stack:
    triton: TritonServer
    gateway: GatewayProcess

    @property
    def gateway_pid(self) -> int:
        assert self.gateway.process is not None
        return self.gateway.process.pid

    @property
    def gateway_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.metrics_port}/metrics"

    @property
    def triton_pid(self) -> int:
        assert self.triton.pid is not None
        return self.triton.pid


@contextlib.contextmanager
def serving_stack(repo: Path, logs: Path) -> Iterator[Stack]:
    """Triton on the repository and the gateway in front of it, as `make serve` runs them."""
    logs.mkdir(parents=True, exist_ok=True)
    triton = TritonServer(
        repo, build_dir=ROOT / "build" / "triton", log_path=logs / "tritonserver.log"
    )
    gateway = GatewayProcess(
        repo,
        "",
        log_path=logs / "gateway.log",
        env={"LTREC_ALLOW_PLAINTEXT": "true", "LTREC_FEEDBACK_DIR": str(logs / "feedback")},
    )
    try:
        triton.start()
        triton.wait_ready(timeout_s=300)
        gateway.triton_grpc_url = triton.grpc_url
        gateway.start()
        gateway.wait_serving(timeout_s=300)
        yield Stack(triton, gateway)
    finally:
        gateway.stop()
        triton.stop()


@contextlib.contextmanager
def naive_peer(checkpoint: Path, repo: Path, logs: Path) -> Iterator[tuple[str, int]]:
    """`benchmarks.naive_server` as a child process; yields its address and pid."""
    (port,) = free_ports(1)
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "naive.log").open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.naive_server",
                f"--checkpoint={checkpoint}",
                f"--model-repository={repo}",
                f"--port={port}",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the naive peer exited with code {process.returncode}")
            with grpc.insecure_channel(address) as channel:
                try:
                    grpc.channel_ready_future(channel).result(timeout=1.0)
                    break
                except grpc.FutureTimeoutError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError("the naive peer did not start within 300 s")
        yield address, process.pid
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
