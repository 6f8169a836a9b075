"""The gateway's container image, built as `make image` builds it (tools/image.py; reused when
nothing it is built from changed) and started with podman as the chart runs it (its own non-root
user, read-only root filesystem, no capabilities), against the real tritonserver on the host
(`--network host`: the container shares the host's loopback). Recommend, gRPC health and /metrics
are called through the container, and its answers are those of `python -m server` on the host.

Where podman or the build cannot run, the tests fail with the reason (CI must build the image).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from export_scripts.export import export
from server.gen.ltrec.v1 import recommender_pb2_grpc
from tests.support.stack import _request, metric_value
from tests.support.tiny_model import ml1m_slice, train_tiny
from tools.image import PODMAN_FLAGS, Built, ImageBuildError, build
from triton_local.server import TritonServer, free_ports
from triton_local.stack import GatewayProcess

# A cold build (a base from Debian packages, the wheels, every layer) took 2.5 minutes on two
# cores and 16 when they were shared with a training run; an up-to-date image is checked in seconds.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

# The Dockerfile's user; the chart's gateway.runAsUser.
IMAGE_UID = 10001
# The gateway's dependencies come to about 210 MB and its base to 130-180 MB; torch alone would
# add over 700 MB.
MAX_IMAGE_BYTES = 450_000_000
NOT_IN_THE_IMAGE = ("torch", "pandas", "transformers", "onnxruntime", "ltrec", "export_scripts")
SERVING_TIMEOUT_S = 120.0


def built_image() -> Built:
    """The image, built or reused; a failed test with the reason where it cannot be built."""
    try:
        return build()
    except ImageBuildError as err:
        reason = str(err)
    pytest.fail(f"the gateway image cannot be built here: {reason}", pytrace=False)


@pytest.fixture(scope="module")
def image() -> Built:
    return built_image()


def podman(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )


@dataclass
class Container:
    name: str
    grpc_port: int
    metrics_port: int
    channel: grpc.Channel
    stub: recommender_pb2_grpc.RecommenderStub
    host_gateway: GatewayProcess
    triton: TritonServer
    model_version: str
    history: list[str]

    def logs(self) -> str:
        done = podman("logs", self.name)
        return (done.stdout + done.stderr)[-3000:]

    def exec_python(self, code: str) -> str:
        done = podman("exec", self.name, "python", "-c", code)
        assert done.returncode == 0, done.stderr
        return done.stdout


def wait_serving(name: str, address: str) -> None:
    """Polls gRPC health until SERVING; fails at once, with the logs, if the container exits."""
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            state = podman("container", "inspect", "--format", "{{.State.Status}}", name)
            if state.stdout.strip() != "running":
                logs = podman("logs", name)
                pytest.fail(
                    f"the gateway container is {state.stdout.strip() or state.stderr.strip()}: "
                    f"{(logs.stdout + logs.stderr)[-3000:]}",
                    pytrace=False,
                )
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the gateway container did not serve in {SERVING_TIMEOUT_S} s")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def container(
    image: Built, tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path
) -> Iterator[Container]:
    root = tmp_path_factory.mktemp("image")
    prepared, users = ml1m_slice(root, n_users=60)
    checkpoint = train_tiny(prepared, root / "artifacts")
    repo = root / "model_repository"
    metadata = export(checkpoint, repo, text_encoder=False, log=lambda _m: None)
    events = prepared.split.train
    history = events[events["user_id"] == users.iloc[0]]["item_id"].tolist()[-15:]
    # The feedback and item stores: the one writable mount, as the chart's volumes.
    state = root / "state"
    state.mkdir()
    state.chmod(0o777)
    grpc_port, metrics_port = free_ports(2)
    name = f"ltrec-gateway-test-{grpc_port}"
    triton = TritonServer(repo, build_dir=triton_build_dir, log_path=root / "triton.log")
    host_gateway = None
    try:
        triton.start()
        triton.wait_ready(timeout_s=180)
        env = {
            "LTREC_GRPC_HOST": "127.0.0.1",
            "LTREC_GRPC_PORT": str(grpc_port),
            "LTREC_METRICS_PORT": str(metrics_port),
            "LTREC_TRITON_URL": triton.grpc_url,
            "LTREC_ALLOW_PLAINTEXT": "true",
            "LTREC_FEEDBACK_DIR": "/state/feedback",
            "LTREC_ITEMS_DIR": "/state/items",
            "LTREC_HISTORY_STORE": "off",
        }
        started = podman(
            "run",
            "--detach",
            "--name",
            name,
            *PODMAN_FLAGS,
            "--read-only",
            "--cap-drop",
            "all",
            "--security-opt",
            "no-new-privileges",
            "--volume",
            f"{repo}:/models:ro",
            "--volume",
            f"{state}:/state",
            *[f"--env={key}={value}" for key, value in env.items()],
            image.tag,
        )
        if started.returncode != 0:
            pytest.fail(f"podman run failed: {started.stderr.strip()}", pytrace=False)
        wait_serving(name, f"127.0.0.1:{grpc_port}")
        # `python -m server` on the host, against the same Triton: what the image must answer.
        host_gateway = GatewayProcess(
            repo, triton.grpc_url, log_path=root / "gateway.log", env={"LTREC_HISTORY_STORE": "off"}
        )
        host_gateway.start()
        host_gateway.wait_serving(timeout_s=SERVING_TIMEOUT_S)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            yield Container(
                name=name,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                channel=channel,
                stub=recommender_pb2_grpc.RecommenderStub(channel),
                host_gateway=host_gateway,
                triton=triton,
                model_version=metadata["model_version"],
                history=history,
            )
    finally:
        podman("rm", "--force", "--time", "5", name)
        if host_gateway is not None:
            host_gateway.stop()
        triton.stop()


def test_image_builds_and_its_size_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    image = built_image()
    with capsys.disabled():
        state = "reused" if image.reused else "built"
        print(
            f"\ngateway image {image.tag} ({state}, base {image.base}): "
            f"{image.size_bytes / 1e6:.0f} MB"
        )
    assert 0 < image.size_bytes < MAX_IMAGE_BYTES


def test_recommend_through_the_container_is_the_host_gateways_answer(
    container: Container,
) -> None:
    reply = container.stub.Recommend(_request(container.history, k=10), timeout=10)
    assert len(reply.items) == 10
    assert reply.model_version == container.model_version
    scores = [item.score for item in reply.items]
    assert scores == sorted(scores, reverse=True)
    assert not {item.item_id for item in reply.items} & set(container.history)

    with grpc.insecure_channel(container.host_gateway.address) as channel:
        host = recommender_pb2_grpc.RecommenderStub(channel).Recommend(
            _request(container.history, k=10), timeout=10
        )
    assert [(i.item_id, i.title, i.reason) for i in reply.items] == [
        (i.item_id, i.title, i.reason) for i in host.items
    ]
    assert scores == pytest.approx([i.score for i in host.items], abs=1e-6)


def test_health_and_metrics_through_the_container(container: Container) -> None:
    health = health_pb2_grpc.HealthStub(container.channel)
    for service in ("", "ltrec.v1.Recommender"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service

    labels = {"code": "OK", "method": "Recommend"}
    before = metric_value(container.metrics_port, "ltrec_gateway_requests_total", labels)
    container.stub.Recommend(_request(container.history, k=5), timeout=10)
    after = metric_value(container.metrics_port, "ltrec_gateway_requests_total", labels)
    assert after == before + 1
    url = f"http://127.0.0.1:{container.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'ltrec_gateway_stage_duration_seconds_count{stage="triton"}' in body
    assert "integration-user" not in body


def test_the_gateway_runs_as_non_root_without_torch(container: Container) -> None:
    # PID 1 of the container is the gateway itself (no shell in between): its real, effective,
    # saved and filesystem uids.
    status = container.exec_python("print(open('/proc/1/status').read())")
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [str(IMAGE_UID)] * 4
    cmdline = container.exec_python("print(open('/proc/1/cmdline').read().split(chr(0)))")
    assert "server" in cmdline and "python" in cmdline

    found = json.loads(
        container.exec_python(
            "import importlib.util, importlib.metadata, json; "
            f"names = {list(NOT_IN_THE_IMAGE)!r}; "
            "dists = {d.metadata['Name'].lower() for d in importlib.metadata.distributions()}; "
            "print(json.dumps({n: importlib.util.find_spec(n) is not None or n in dists "
            "for n in names}))"
        )
    )
    assert found == dict.fromkeys(NOT_IN_THE_IMAGE, False)
    # The root filesystem is read-only, as the chart mounts it.
    probe = podman("exec", container.name, "touch", "/app/probe")
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr


def test_sigterm_stops_the_container_cleanly(container: Container) -> None:
    """What a rolling update sends: the gateway drains and exits 0 within the grace period."""
    started = time.monotonic()
    stopped = podman("stop", "--time", "30", container.name, timeout_s=60)
    assert stopped.returncode == 0, stopped.stderr
    assert time.monotonic() - started < 30
    code = podman("container", "inspect", "--format", "{{.State.ExitCode}}", container.name)
    assert code.stdout.strip() == "0", container.logs()
