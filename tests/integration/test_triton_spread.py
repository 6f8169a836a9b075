"""Load spread over Triton pods: two real tritonservers serve one repository, one gateway is
pointed at both (an `ipv4:` target with two addresses, as the chart's `dns:///` headless Service
resolves to one address per ready pod), and its round_robin channel sends each a fair share of
the Recommend calls, counted by each Triton's own statistics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton_grpc

from export_scripts.export import export
from ltrec_core import contract
from server.gen.ltrec.v1 import recommender_pb2_grpc
from tests.support.stack import _request
from tests.support.tiny_model import ml1m_slice, train_tiny
from triton_local.server import TritonServer
from triton_local.stack import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CALLS = 40


@dataclass
class TwoTritons:
    tritons: tuple[TritonServer, TritonServer]
    gateway: GatewayProcess
    history: list[str]


@pytest.fixture(scope="module")
def two_tritons(
    tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path
) -> Iterator[TwoTritons]:
    root = tmp_path_factory.mktemp("spread")
    prepared, users = ml1m_slice(root, n_users=60)
    checkpoint = train_tiny(prepared, root / "artifacts")
    repo = root / "model_repository"
    export(checkpoint, repo, text_encoder=False, log=lambda _m: None)
    events = prepared.split.train
    history = events[events["user_id"] == users.iloc[0]]["item_id"].tolist()[-15:]
    tritons = tuple(
        TritonServer(repo, build_dir=triton_build_dir, log_path=root / f"triton-{n}.log")
        for n in (1, 2)
    )
    gateway = None
    try:
        for triton in tritons:
            triton.start()
        for triton in tritons:
            triton.wait_ready(timeout_s=180)
        target = "ipv4:" + ",".join(triton.grpc_url for triton in tritons)
        gateway = GatewayProcess(repo, target, log_path=root / "gateway.log")
        gateway.start()
        gateway.wait_serving(timeout_s=120)
        yield TwoTritons((tritons[0], tritons[1]), gateway, history)
    finally:
        if gateway is not None:
            gateway.stop()
        for triton in tritons:
            triton.stop()


def served(triton: TritonServer) -> int:
    """Successful inferences of the ranking ensemble, by Triton's statistics API."""
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    try:
        stats = client.get_inference_statistics(contract.ENSEMBLE_MODEL, as_json=True)
    finally:
        client.close()
    return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats["model_stats"])


def test_round_robin_gives_each_triton_a_fair_share(two_tritons: TwoTritons) -> None:
    with grpc.insecure_channel(two_tritons.gateway.address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        # Until the gateway's channel has connected to both, round_robin uses the one it has.
        deadline = time.monotonic() + 30
        while min(served(t) for t in two_tritons.tritons) == 0:
            assert time.monotonic() < deadline, "one Triton never got a call"
            stub.Recommend(_request(two_tritons.history, k=10), timeout=10)
        before = [served(t) for t in two_tritons.tritons]
        for _ in range(CALLS):
            reply = stub.Recommend(_request(two_tritons.history, k=10), timeout=10)
            assert len(reply.items) == 10
    shares = [served(t) - b for t, b in zip(two_tritons.tritons, before, strict=True)]
    print(f"Recommend calls served by each Triton: {shares} of {CALLS}")
    assert sum(shares) == CALLS, shares
    assert min(shares) >= CALLS // 4, shares
