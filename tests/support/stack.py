"""The real serving stack of the integration tests: a tiny model trained on a slice of ML-1M,
exported, served by tritonserver behind the gateway (the `stack` fixture, one per module)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pandas as pd
import pytest

from export_scripts.export import export
from ltrec_core import contract
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.support.tiny_model import ml1m_slice, train_tiny
from triton_local.server import TritonServer
from triton_local.stack import GatewayProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the export loads MiniLM from site-packages


@dataclass
class Stack:
    repo: Path
    triton: TritonServer
    gateway: GatewayProcess
    channel: grpc.Channel
    stub: recommender_pb2_grpc.RecommenderStub
    metadata: dict
    catalogue: pd.DataFrame
    history: list[str]  # item ids of a real user history, oldest first


@pytest.fixture(scope="module", name="stack")
def serving_stack(
    tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path
) -> Iterator[Stack]:
    with started_stack(tmp_path_factory.mktemp("serving"), triton_build_dir) as stack:
        yield stack


@contextlib.contextmanager
def started_stack(
    root: Path, triton_build_dir: Path, gateway_env: Mapping[str, str] | None = None
) -> Iterator[Stack]:
    """The stack under `root`; `gateway_env`: more `LTREC_*` settings for the gateway."""
    prepared, users = ml1m_slice(root)
    checkpoint = train_tiny(prepared, root / "artifacts")
    repo = root / "model_repository"
    metadata = export(checkpoint, repo, log=lambda _m: None)

    triton = TritonServer(repo, build_dir=triton_build_dir)
    triton.start()
    gateway = GatewayProcess(repo, triton.grpc_url, log_path=root / "gateway.log", env=gateway_env)
    try:
        triton.wait_ready(timeout_s=180)
        gateway.start()
        gateway.wait_serving(timeout_s=120)
        channel = grpc.insecure_channel(gateway.address)
        first_user = prepared.split.train[prepared.split.train["user_id"] == users.iloc[0]]
        yield Stack(
            repo=repo,
            triton=triton,
            gateway=gateway,
            channel=channel,
            stub=recommender_pb2_grpc.RecommenderStub(channel),
            metadata=metadata,
            catalogue=pd.read_csv(repo / contract.CATALOGUE_FILE, keep_default_na=False),
            history=first_user["item_id"].tolist()[-15:],
        )
        channel.close()
    finally:
        gateway.stop()
        triton.stop()


def _request(history: list[str], k: int = 10, **kwargs: object) -> recommender_pb2.RecommendRequest:
    return recommender_pb2.RecommendRequest(
        user_id="integration-user",
        history=[
            recommender_pb2.HistoryEvent(
                item_id=i, event_type=recommender_pb2.EVENT_TYPE_RATING, timestamp=1_000 + n
            )
            for n, i in enumerate(history)
        ],
        context=recommender_pb2.Context(timestamp=978_300_760, region="zip4"),
        k=k,
        **kwargs,
    )
