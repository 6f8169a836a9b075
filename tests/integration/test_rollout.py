"""A model rollout and its rollback under live traffic, with real processes in the chart's
topology (helm/ltrec README, "Model versions, canary, promotion and rollback"), minus Kubernetes.

Two model versions (two tiny trainings of the same ML-1M slice, different seeds) are exported.
The chart runs each version as a unit: Triton pods, and gateway pods whose Triton target is that
unit's headless Service, so that a gateway only ever reaches Tritons of its own version. Here a
unit is a tritonserver plus a gateway pointed at it. An asyncio TCP proxy stands in for the
gateway Service: each new connection goes to one of its current endpoints (every ready gateway
of every unit), and connections already open stay where they are (as with kube-proxy). A few
clients send Recommend calls through it the whole time, as real callers would: one channel each,
`wait_for_ready` and a deadline. The rollout is the README's:

1. canary: the new unit starts beside the old one; its gateway is up but NOT_SERVING while its
   Triton is not ready (the readiness probe keeps it out of the Service), then SERVING once the
   ensemble is loaded and serves the gateway's model version and content hash; it joins the
   endpoints, and callers reach both versions (2 Tritons, 2 gateways, the proxy);
2. promotion (the versions swap tracks: no process changes), then the old unit is removed: its
   gateway leaves the endpoints and gets SIGTERM; it goes NOT_SERVING and keeps serving for
   LTREC_SHUTDOWN_DRAIN_SECONDS, during which its connections reach
   LTREC_MAX_CONNECTION_AGE_SECONDS and get a graceful GOAWAY, so clients reconnect through the
   proxy to the new unit; then it finishes in-flight calls within LTREC_SHUTDOWN_GRACE_SECONDS and
   exits; only then its Triton stops (the chart's Triton preStop delay). (Stopping at once instead
   loses the calls that cross the final GOAWAY, answered CANCELLED: grpc/grpc#41785.)

Rolled v1 -> v2 and back to v1 the same way, no call may fail, callers see both versions during
each canary and only the new one once the old unit is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from export_scripts.export import export
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.support.stack import _request
from tests.support.tiny_model import ml1m_slice, train_tiny
from triton_local.server import TritonServer, free_ports
from triton_local.stack import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

N_USERS = 100
CLIENTS = 4
PAUSE_S = 0.05  # between one client's calls: steady traffic that leaves the two cores some room
DEADLINE_S = 10.0
SETTLE_S = 3.0  # traffic kept going on each version after a roll
GRACE_S = 10.0  # LTREC_SHUTDOWN_GRACE_SECONDS, the chart's default (gateway.env)
# Shorter than the chart's (10 s age, 12 s drain) to keep the test short; same relation.
MAX_CONNECTION_AGE_S = 1.0
DRAIN_S = 2.0
START_TIMEOUT_S = 180.0
# Four servers share the machine's cores with the clients (and whatever else runs): a Triton
# call may wait far beyond the chart's 2 s while a new Triton loads its models. What this test
# asserts is that no call is lost or mixed, so the gateway waits up to most of the deadline.
TRITON_TIMEOUT_S = 8.0
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Bundles:
    """Two exported model repositories of different versions, and a history to ask about."""

    repos: dict[str, Path]  # model version -> repository
    history: list[str]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    root = tmp_path_factory.mktemp("rollout")
    prepared, users = ml1m_slice(root, N_USERS)
    repos = {}
    for seed in (0, 1):
        checkpoint = train_tiny(prepared, root / f"artifacts-{seed}", seed=seed)
        # One folder per bundle: the gateway keeps files beside its repository.
        repo = root / f"bundle-{seed}" / "model_repository"
        metadata = export(checkpoint, repo, text_encoder=False, log=lambda _m: None)
        repos[metadata["model_version"]] = repo
    assert len(repos) == 2, f"both trainings exported the same version: {list(repos)}"
    first_user = prepared.split.train[prepared.split.train["user_id"] == users.iloc[0]]
    return Bundles(repos, first_user["item_id"].tolist()[-15:])


@dataclass
class Pod:
    """Triton and a gateway serving one model version, like one replica of each Deployment."""

    version: str
    triton: TritonServer
    gateway: GatewayProcess

    def stop(self) -> None:
        self.gateway.stop()
        self.triton.stop()


def _health(gateway: GatewayProcess, timeout_s: float = 60.0) -> int:
    """The gateway's overall health status, once its port answers at all."""
    assert gateway.process is not None
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(gateway.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            code = gateway.process.poll()
            assert code is None, f"the gateway exited with code {code}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                return int(reply.status)
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the gateway never answered health checks"
                time.sleep(0.2)


def start_pod(version: str, repo: Path, build_dir: Path, logs: Path, pods: list[Pod]) -> Pod:
    """Starts the gateway first and Triton second, so that the readiness gate is seen closed,
    then waits for it to open (grpc.health.v1 SERVING: Triton's ensemble is ready)."""
    triton_grpc, triton_http, triton_metrics, grpc_port, metrics_port = free_ports(5)
    triton = TritonServer(
        repo,
        grpc_port=triton_grpc,
        http_port=triton_http,
        metrics_port=triton_metrics,
        build_dir=build_dir,
        log_path=logs / f"triton-{version}-{triton_http}.log",
    )
    gateway = GatewayProcess(
        repo,
        triton.grpc_url,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_path=logs / f"gateway-{version}-{grpc_port}.log",
        env={
            "LTREC_SHUTDOWN_GRACE_SECONDS": str(GRACE_S),
            "LTREC_SHUTDOWN_DRAIN_SECONDS": str(DRAIN_S),
            "LTREC_MAX_CONNECTION_AGE_SECONDS": str(MAX_CONNECTION_AGE_S),
            "LTREC_TRITON_TIMEOUT_SECONDS": str(TRITON_TIMEOUT_S),
        },
    )
    pod = Pod(version, triton, gateway)
    pods.append(pod)
    gateway.start()
    assert _health(gateway) != SERVING, "SERVING with no Triton behind it"
    triton.start()
    gateway.wait_serving(timeout_s=START_TIMEOUT_S)
    return pod


class ServiceProxy:
    """A Kubernetes Service in miniature: a TCP listener that sends each new connection to one of
    its current endpoints, round robin, and leaves open connections where they are."""

    def __init__(self) -> None:
        self.endpoints: list[tuple[str, int]] = []
        self._turn = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_writer = None
        try:
            if not self.endpoints:
                return
            host, port = self.endpoints[self._turn % len(self.endpoints)]
            self._turn += 1
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
            pipes = {
                asyncio.create_task(self._pipe(reader, upstream_writer)),
                asyncio.create_task(self._pipe(upstream_reader, writer)),
            }
            self._pipes |= pipes
            # Either side closing closes the connection, as a TCP proxy would.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for task in pipes:
                task.cancel()
            self._pipes -= pipes
        except OSError:
            pass  # the endpoint refused: the client sees its connection closed and reconnects
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()


@dataclass
class Failure:
    client: int
    at: float  # time.monotonic()
    code: grpc.StatusCode
    details: str

    def __str__(self) -> str:
        return f"client {self.client} at {self.at:.1f}: {self.code.name}: {self.details}"


@dataclass
class Traffic:
    # client -> (time.monotonic(), model version) per reply
    replies: dict[int, list[tuple[float, str]]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)


async def client(
    n: int,
    address: str,
    request: recommender_pb2.RecommendRequest,
    traffic: Traffic,
    stop: asyncio.Event,
) -> None:
    # A channel of its own (no shared subchannel): one connection per client through the proxy.
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        replies = traffic.replies.setdefault(n, [])
        while not stop.is_set():
            try:
                reply = await stub.Recommend(request, timeout=DEADLINE_S, wait_for_ready=True)
                replies.append((time.monotonic(), reply.model_version))
            except grpc.aio.AioRpcError as err:
                traffic.failures.append(Failure(n, time.monotonic(), err.code(), err.details()))
            await asyncio.sleep(PAUSE_S)


@dataclass
class Drain:
    version: str
    sigterm_at: float  # time.monotonic()
    exit_code: int | None
    seconds: float


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    """Every pod the test starts; all stopped at teardown, whatever happened."""
    started: list[Pod] = []
    yield started
    for pod in reversed(started):
        pod.stop()


def test_rollout_and_rollback_under_traffic_lose_no_request(
    bundles: Bundles,
    pods: list[Pod],
    triton_build_dir: Path,
    tmp_path: Path,
) -> None:
    v1, v2 = bundles.repos
    request = _request(bundles.history, k=10)
    drains: list[Drain] = []
    proxy = ServiceProxy()
    removed_at: dict[str, float] = {}  # version -> when its unit's gateway had exited
    canary_at: dict[str, float] = {}  # version -> when its unit joined the endpoints

    async def canary(version: str) -> Pod:
        new = await asyncio.to_thread(
            start_pod, version, bundles.repos[version], triton_build_dir, tmp_path, pods
        )
        proxy.endpoints.append(("127.0.0.1", new.gateway.grpc_port))
        canary_at[version] = time.monotonic()
        await asyncio.sleep(SETTLE_S)
        return new

    async def remove(old: Pod) -> None:
        """The old unit after promotion: out of the endpoints, gateway drained, then Triton."""
        proxy.endpoints.remove(("127.0.0.1", old.gateway.grpc_port))
        sigterm_at = time.monotonic()
        code = await asyncio.to_thread(old.gateway.stop, GRACE_S + 10)
        removed_at[old.version] = time.monotonic()
        drains.append(Drain(old.version, sigterm_at, code, removed_at[old.version] - sigterm_at))
        await asyncio.to_thread(old.triton.stop)
        await asyncio.sleep(SETTLE_S)

    async def scenario() -> Traffic:
        first = await asyncio.to_thread(
            start_pod, v1, bundles.repos[v1], triton_build_dir, tmp_path, pods
        )
        address = await proxy.start()
        proxy.endpoints.append(("127.0.0.1", first.gateway.grpc_port))
        traffic = Traffic()
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(client(n, address, request, traffic, stop)) for n in range(CLIENTS)
        ]
        try:
            await asyncio.sleep(SETTLE_S)
            second = await canary(v2)
            await remove(first)
            third = await canary(v1)  # rollback: the old version as canary, then promoted
            await remove(second)
            assert third.version == v1
        finally:
            stop.set()
            await asyncio.gather(*clients)
            await proxy.close()
        return traffic

    traffic = asyncio.run(scenario())

    phases = {**{f"canary {v}": t for v, t in canary_at.items()}}
    phases |= {f"{v} removed": t for v, t in removed_at.items()}
    assert [str(f) for f in traffic.failures] == [], sorted(phases.items(), key=lambda p: p[1])
    replies = sorted(r for versions in traffic.replies.values() for r in versions)

    def served(start: float, end: float) -> set[str]:
        return {version for at, version in replies if start <= at < end}

    # Canary: both units answer callers, 2 Tritons and 2 gateways behind the proxy.
    assert served(canary_at[v2], removed_at[v1]) == {v1, v2}
    # The old unit gone: only the new version, until the rollback's canary.
    assert served(removed_at[v1], canary_at[v1]) == {v2}
    assert served(canary_at[v1], removed_at[v2]) == {v1, v2}
    assert served(removed_at[v2], math.inf) == {v1}
    for n in range(CLIENTS):
        versions = [version for _, version in traffic.replies[n]]
        assert versions[0] == v1 and versions[-1] == v1 and v2 in versions, f"client {n}"
    assert sum(1 for _, v in replies if v == v2) >= CLIENTS * 10, "too little traffic on v2"
    # Each old gateway drained and exited cleanly on SIGTERM, within drain + grace.
    assert [(d.version, d.exit_code) for d in drains] == [(v1, 0), (v2, 0)]
    assert all(DRAIN_S <= d.seconds < DRAIN_S + GRACE_S for d in drains), drains
    print(
        f"\nrollout v1 -> v2 -> v1 by canary and promotion: {len(replies)} calls from {CLIENTS} "
        f"clients, 0 failed; old gateways exited after "
        f"{', '.join(f'{d.seconds:.1f} s' for d in drains)}"
    )


def test_a_gateway_paired_with_another_versions_triton_is_not_serving(
    bundles: Bundles, pods: list[Pod], triton_build_dir: Path, tmp_path: Path
) -> None:
    """A gateway loaded with v1 in front of a Triton serving v2 (what a chart that mixed units
    would do) stays NOT_SERVING and counts the mismatch; a Triton of its own version on the same
    address makes it SERVING again, without a restart."""
    v1, v2 = bundles.repos
    triton_grpc, triton_http, triton_metrics, grpc_port, metrics_port = free_ports(5)

    def triton(version: str) -> TritonServer:
        return TritonServer(
            bundles.repos[version],
            grpc_port=triton_grpc,
            http_port=triton_http,
            metrics_port=triton_metrics,
            build_dir=triton_build_dir,
            log_path=tmp_path / f"triton-{version}.log",
        )

    gateway = GatewayProcess(
        bundles.repos[v1],
        f"127.0.0.1:{triton_grpc}",
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_path=tmp_path / "gateway.log",
    )
    other = triton(v2)
    pods.append(Pod(v1, other, gateway))
    gateway.start()
    other.start()
    other.wait_ready(timeout_s=START_TIMEOUT_S)

    def mismatch() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        (line,) = [
            ln for ln in text.splitlines() if ln.startswith("ltrec_gateway_model_version_mismatch ")
        ]
        return float(line.split()[1])

    deadline = time.monotonic() + 30
    while mismatch() != 1:
        assert time.monotonic() < deadline, "the mismatch was never counted"
        time.sleep(0.2)
    for _ in range(5):  # polls go on: still not serving
        assert _health(gateway) != SERVING
        time.sleep(0.3)
    log = (tmp_path / "gateway.log").read_text()
    assert f"Triton serves model {v2}" in log and f"this gateway loaded {v1}" in log

    other.stop()
    own = triton(v1)
    pods.append(Pod(v1, own, gateway))
    own.start()
    gateway.wait_serving(timeout_s=START_TIMEOUT_S)
    assert mismatch() == 0
