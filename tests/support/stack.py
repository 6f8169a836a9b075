"""The real serving stack of the integration tests: a tiny model trained on a slice of ML-1M,
exported, served by tritonserver behind the gateway (the `stack` fixture, one per module); more
gateway replicas in front of the same Triton (`start_replica`); the requests the stored-history
tests send (`click_feedback`, `by_user_id`, `clicks_as_history`); a gateway's metrics as numbers.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from export_scripts.export import export
from ltrec_core import contract
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.support.tiny_model import ml1m_slice, train_tiny
from triton_local.server import TritonServer
from triton_local.stack import GatewayProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the export loads MiniLM from site-packages

# 978300760 = 2000-12-31 22:12:40 UTC: the context of every request below.
CONTEXT = recommender_pb2.Context(timestamp=978_300_760, region="zip4")


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
    root: Path,
    triton_build_dir: Path,
    gateway_env: Mapping[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    export_options: Mapping[str, object] | None = None,
) -> Iterator[Stack]:
    """The stack under `root`; `gateway_env`: more `LTREC_*` settings for the gateway;
    `credentials`: the stack's channel speaks TLS with them (the gateway serves TLS);
    `export_options`: more keyword arguments of the export (`retrieval="ann"`, say)."""
    prepared, users = ml1m_slice(root)
    checkpoint = train_tiny(prepared, root / "artifacts")
    repo = root / "model_repository"
    metadata = export(checkpoint, repo, log=lambda _m: None, **dict(export_options or {}))

    triton = TritonServer(repo, build_dir=triton_build_dir)
    triton.start()
    gateway = GatewayProcess(repo, triton.grpc_url, log_path=root / "gateway.log", env=gateway_env)
    try:
        triton.wait_ready(timeout_s=180)
        gateway.start()
        gateway.wait_serving(timeout_s=120, credentials=credentials)
        channel = (
            grpc.insecure_channel(gateway.address)
            if credentials is None
            else grpc.secure_channel(gateway.address, credentials)
        )
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
        context=CONTEXT,
        k=k,
        **kwargs,
    )


def click_feedback(
    request_id: str, user_id: str, items: Sequence[str], first_timestamp: int
) -> recommender_pb2.FeedbackBatchRequest:
    """Clicks on `items` of the served list `request_id`, one second apart: what the gateway
    keeps as the user's stored history."""
    return recommender_pb2.FeedbackBatchRequest(
        events=[
            recommender_pb2.FeedbackEvent(
                request_id=request_id,
                user_id=user_id,
                item_id=item,
                type=recommender_pb2.FEEDBACK_TYPE_CLICK,
                timestamp=first_timestamp + n,
            )
            for n, item in enumerate(items)
        ]
    )


def by_user_id(user_id: str, k: int = 5) -> recommender_pb2.RecommendRequest:
    """A Recommend with the user id and no history: answered from the stored history, if any."""
    return recommender_pb2.RecommendRequest(user_id=user_id, k=k, context=CONTEXT)


def clicks_as_history(
    user_id: str, items: Sequence[str], first_timestamp: int, k: int = 5
) -> recommender_pb2.RecommendRequest:
    """The Recommend that sends what `click_feedback` stores (clicks are kept as views)."""
    request = by_user_id(user_id, k)
    request.history.extend(
        recommender_pb2.HistoryEvent(
            item_id=item, event_type=recommender_pb2.EVENT_TYPE_VIEW, timestamp=first_timestamp + n
        )
        for n, item in enumerate(items)
    )
    return request


def metric_value(metrics_port: int, sample: str, labels: Mapping[str, str] | None = None) -> float:
    """One sample of a gateway's /metrics (0 when absent, as a counter never incremented)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    wanted = dict(labels or {})
    for family in text_string_to_metric_families(body):
        for found in family.samples:
            if found.name == sample and found.labels == wanted:
                return float(found.value)
    return 0.0


@dataclass
class Replica:
    """One more gateway process in front of a stack's Triton, with its channel."""

    process: GatewayProcess
    channel: grpc.Channel
    stub: recommender_pb2_grpc.RecommenderStub

    def metric(self, sample: str, **labels: str) -> float:
        return metric_value(self.process.metrics_port, sample, labels)

    def close(self) -> None:
        self.channel.close()
        self.process.stop()


def start_replica(
    repo: Path, triton_grpc_url: str, log_path: Path, env: Mapping[str, str]
) -> Replica:
    """A gateway on `repo` (its feedback and item stores beside it, shared with the other
    replicas of the repository), serving once it says SERVING; `env`: its `LTREC_*` settings,
    `LTREC_FEEDBACK_REPLICA` among them (each replica writes segments of its own)."""
    process = GatewayProcess(repo, triton_grpc_url, log_path=log_path, env=env)
    try:
        process.start()
        process.wait_serving(timeout_s=120)
    except BaseException:
        process.stop()
        raise
    channel = grpc.insecure_channel(process.address)
    return Replica(process, channel, recommender_pb2_grpc.RecommenderStub(channel))
