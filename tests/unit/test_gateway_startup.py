"""Gateway start-up (configuration, model repository files) and the real tritonclient transport.

The transport tests run `tritonclient.grpc.aio` against an in-process fake of Triton's gRPC
inference service, so the tensors' wire names, dtypes and shapes are checked too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from ltrec_core import contract
from server.app import create_server, event_loop_factory
from server.catalogue import ModelRepositoryError, load_catalogue, load_metadata
from server.config import ConfigError, GatewayConfig
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.support.gateway import ITEMS, METADATA, run_async, write_repository
from tests.support.triton_fake import FakeTritonService

REPO_ROOT = Path(__file__).resolve().parents[2]

# --- Configuration -------------------------------------------------------------------------------


def test_config_reads_prefixed_environment_variables(tmp_path: Path) -> None:
    config = GatewayConfig.from_env(
        {
            "LTREC_GRPC_HOST": "127.0.0.1",
            "LTREC_GRPC_PORT": "6000",
            "LTREC_TRITON_URL": "triton:8001",
            "LTREC_MODEL_REPOSITORY": str(tmp_path),
            "LTREC_TRITON_TIMEOUT_SECONDS": "0.5",
            "LTREC_TRITON_RETRIES": "0",
            "LTREC_MAX_K": "50",
            "LTREC_LOG_LEVEL": "debug",
            "LTREC_ALLOW_PLAINTEXT": "true",
            "UNRELATED": "x",
        }
    )
    assert (config.grpc_host, config.grpc_port, config.triton_url) == (
        "127.0.0.1",
        6000,
        "triton:8001",
    )
    assert config.model_repository == tmp_path
    assert (config.triton_timeout_seconds, config.triton_retries, config.max_k) == (0.5, 0, 50)
    assert config.log_level == "DEBUG"
    assert config.metrics_port == 9100  # default kept


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LTREC_GRPC_PORT": "http"}, "LTREC_GRPC_PORT must be an integer, got 'http'"),
        ({"LTREC_GRPC_PORT": "70000"}, "LTREC_GRPC_PORT must be in [0, 65535], got 70000"),
        ({"LTREC_TRITON_TIMEOUT_SECONDS": "0"}, "LTREC_TRITON_TIMEOUT_SECONDS must be a finite"),
        ({"LTREC_TRITON_TIMEOUT_SECONDS": "soon"}, "LTREC_TRITON_TIMEOUT_SECONDS must be a number"),
        ({"LTREC_TRITON_RETRIES": "-1"}, "LTREC_TRITON_RETRIES must be in [0, 4], got -1"),
        (
            {"LTREC_LOG_FLUSH_INTERVAL_SECONDS": "2"},
            "LTREC_LOG_FLUSH_INTERVAL_SECONDS must be in [0, 1], got 2.0",
        ),
        (
            {"LTREC_LOG_FLUSH_INTERVAL_SECONDS": "nan"},
            "LTREC_LOG_FLUSH_INTERVAL_SECONDS must be in [0, 1], got nan",
        ),
        # gRPC's retry policy allows at most 5 attempts.
        ({"LTREC_TRITON_RETRIES": "5"}, "LTREC_TRITON_RETRIES must be in [0, 4], got 5"),
        (
            {"LTREC_TRITON_RETRY_BACKOFF_SECONDS": "0"},
            "LTREC_TRITON_RETRY_BACKOFF_SECONDS must be in [0.001, 60], got 0",
        ),
        ({"LTREC_MAX_K": "0"}, "LTREC_MAX_K must be >= 1, got 0"),
        ({"LTREC_LOG_LEVEL": "loud"}, "LTREC_LOG_LEVEL must be one of"),
    ],
)
def test_bad_config_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        GatewayConfig.from_env(env)
    assert message in str(caught.value)


# --- Model repository files ----------------------------------------------------------------------


def test_catalogue_and_metadata_load(tmp_path: Path) -> None:
    repository = write_repository(tmp_path)
    catalogue = load_catalogue(repository / contract.CATALOGUE_FILE)
    metadata = load_metadata(repository / contract.METADATA_FILE)
    assert catalogue.size == len(ITEMS)
    assert catalogue.index_of["i2"] == 2 and catalogue.titles[2] == 'Heat, "The" (1995)'
    # index 0 is padding (never long tail), then the catalogue's own flags in order
    assert catalogue.long_tail.tolist() == [False] + [bool(row[3]) for row in ITEMS]
    assert catalogue.popularity[1] == 500 and catalogue.popularity.dtype == np.int64
    assert metadata.device_buckets == {"desktop": 1, "mobile": 2}
    assert metadata.region_buckets == {"zip0": 1, "zip1": 2}
    assert metadata.default_long_tail_weight == 0.25
    assert metadata.similar_items_default_long_tail_weight == 0.01


def test_metadata_without_a_similar_items_default_serves_similar_items_at_zero(
    tmp_path: Path,
) -> None:
    """A repository exported before SimilarItems had its own default: never Recommend's."""
    repository = write_repository(tmp_path)
    old = {k: v for k, v in METADATA.items() if k != contract.SIMILAR_ITEMS_DEFAULT_WEIGHT_KEY}
    (repository / contract.METADATA_FILE).write_text(json.dumps(old), encoding="utf-8")
    metadata = load_metadata(repository / contract.METADATA_FILE)
    assert metadata.similar_items_default_long_tail_weight == 0.0
    assert metadata.default_long_tail_weight == 0.25


HEADER = ",".join(contract.CATALOGUE_COLUMNS) + "\n"
BAD_CATALOGUES = {
    "wrong header": ("id,item_id,title,popularity,long_tail\n1,a,A,1,0\n", "header must be"),
    "exported before the item fields": (
        "index,item_id,title,popularity,long_tail\n1,a,A,1,0\n",
        "re-run the export",
    ),
    "index gap": (HEADER + "1,a,A,1,0,,,\n3,b,B,1,0,,,\n", "line 3: index must be 2"),
    "popularity not integer": (
        HEADER + "1,a,A,many,0,,,\n",
        "line 2: index and popularity must be integers",
    ),
    "long_tail not 0/1": (HEADER + "1,a,A,1,yes,,,\n", "line 2: long_tail must be 0 or 1"),
    "price bucket unknown": (
        HEADER + "1,a,A,1,0,Books,Acme,cheap\n",
        "line 2: price_bucket must be empty or one of budget, mid-range, premium, got 'cheap'",
    ),
    "missing field": (HEADER + "1,a,A,1,0,,\n", "expected 8 fields"),
    "duplicate id": (HEADER + "1,a,A,1,0,,,\n2,a,B,1,0,,,\n", "duplicate item_id"),
    "no items": (HEADER, "no items"),
    "empty file": ("", "header must be"),
}


@pytest.mark.parametrize("case", BAD_CATALOGUES.values(), ids=BAD_CATALOGUES.keys())
def test_malformed_catalogue_fails_startup_naming_the_file(
    tmp_path: Path, case: tuple[str, str]
) -> None:
    text, message = case
    repository = write_repository(tmp_path)
    (repository / contract.CATALOGUE_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(ModelRepositoryError) as caught:
        create_server(_config(repository))
    assert contract.CATALOGUE_FILE in str(caught.value)
    assert message in str(caught.value)


def _metadata_with(**changes: Any) -> str:
    return json.dumps({**METADATA, **changes})


BAD_METADATA = {
    "not json": ("{model_version", "cannot read JSON"),
    "no version": (_metadata_with(model_version=""), "model_version must be a non-empty string"),
    "bad max_history": (_metadata_with(max_history=0), "max_history must be an integer >= 1"),
    "default above max": (
        _metadata_with(default_long_tail_weight=3.0),
        "default_long_tail_weight must be in [0, long_tail_weight_max=2]",
    ),
    "similar default above max": (
        _metadata_with(similar_items_default_long_tail_weight=2.5),
        "similar_items_default_long_tail_weight must be in [0, long_tail_weight_max=2], got 2.5",
    ),
    "similar default not a number": (
        _metadata_with(similar_items_default_long_tail_weight="0.01"),
        "similar_items_default_long_tail_weight must be a number, got '0.01'",
    ),
    "event types drift": (
        _metadata_with(vocabularies={**METADATA["vocabularies"], "event_types": ["view", "buy"]}),
        "vocabularies.event_types must be",
    ),
    "no vocabularies": (_metadata_with(vocabularies=None), "vocabularies must be an object"),
    "batch rows past the ensembles' bound": (
        _metadata_with(max_batch_rows=65),
        "max_batch_rows must be an integer in [1, 64], got 65",
    ),
    "batch rows not a number": (
        _metadata_with(max_batch_rows="16"),
        "max_batch_rows must be an integer in [1, 64], got '16'",
    ),
    "exported before the item filter": (
        _metadata_with(item_filter=None),
        "item_filter must be true: this repository was exported before the scorer took the "
        "business filter",
    ),
}


@pytest.mark.parametrize("case", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_malformed_metadata_fails_startup_naming_the_file(
    tmp_path: Path, case: tuple[str, str]
) -> None:
    text, message = case
    repository = write_repository(tmp_path)
    (repository / contract.METADATA_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(ModelRepositoryError) as caught:
        create_server(_config(repository))
    assert contract.METADATA_FILE in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.parametrize("missing", [contract.CATALOGUE_FILE, contract.METADATA_FILE])
def test_missing_file_fails_startup_naming_the_file(tmp_path: Path, missing: str) -> None:
    repository = write_repository(tmp_path)
    (repository / missing).unlink()
    with pytest.raises(ModelRepositoryError, match=f"{missing}: file not found"):
        create_server(_config(repository))


def test_python_m_server_exits_non_zero_when_the_catalogue_is_missing(tmp_path: Path) -> None:
    repository = write_repository(tmp_path)
    (repository / contract.CATALOGUE_FILE).unlink()
    env = {
        **os.environ,
        "LTREC_GRPC_HOST": "127.0.0.1",
        "LTREC_GRPC_PORT": "0",
        "LTREC_METRICS_PORT": "0",
        "LTREC_MODEL_REPOSITORY": str(repository),
        "LTREC_ALLOW_PLAINTEXT": "1",
        "LTREC_FEEDBACK_DIR": str(tmp_path / "feedback"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert contract.CATALOGUE_FILE in result.stderr


def _config(repository: Path, **changes: Any) -> GatewayConfig:
    settings: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "model_repository": repository,
        "health_poll_interval_seconds": 0.05,
        "triton_retry_backoff_seconds": 0.01,
        "allow_plaintext": True,
        "feedback_dir": repository.parent / "feedback",
        "items_dir": repository.parent / "items",
        "history_sqlite_path": repository.parent / "history" / "history.sqlite3",
    }
    settings.update(changes)
    return GatewayConfig(**settings)


# --- The real tritonclient transport -------------------------------------------------------------


@run_async
async def test_grpc_transport_sends_the_contract_tensors_to_triton(tmp_path: Path) -> None:
    triton = grpc.aio.server()
    fake = FakeTritonService()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, triton)
    triton_port = triton.add_insecure_port("127.0.0.1:0")
    await triton.start()
    repository = write_repository(tmp_path)
    config = _config(repository, triton_url=f"127.0.0.1:{triton_port}")
    server, port = create_server(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            request = recommender_pb2.RecommendRequest(
                k=3,
                history=[recommender_pb2.HistoryEvent(item_id="i1")],
                request_id="wire-1",
            )
            response = await stub.Recommend(request, timeout=5)
    finally:
        await server.stop(None)
        await triton.stop(None)

    assert [item.item_id for item in response.items] == ["i3", "i2"]  # i1 is history: dropped
    assert response.items[0].reason == 'Because you viewed "Toy Story (1995)"'
    (sent,) = fake.requests
    assert sent.model_name == contract.ENSEMBLE_MODEL and sent.id == "wire-1"
    wire = {t.name: (t.datatype, list(t.shape)) for t in sent.inputs}
    # One row of a batch; history padded to max_history (3 here), exclusions to 16.
    assert wire == {
        contract.HISTORY_ITEMS: ("INT64", [1, 3]),
        contract.HISTORY_EVENT_TYPES: ("INT64", [1, 3]),
        contract.CONTEXT: ("INT64", [1, 4]),
        contract.EXCLUDE_ITEMS: ("INT64", [1, contract.EXCLUDE_BUCKET_MIN]),
        contract.LONG_TAIL_WEIGHT: ("FP32", [1, 1]),
        contract.TOP_K: ("INT64", [1, 1]),
        contract.EXTRA_ITEM_VECTORS: ("FP32", [1, 0, METADATA["embedding_dim"]]),
        contract.EXTRA_POPULARITY: ("FP32", [1, 0]),
        contract.ITEM_ELIGIBLE: ("BOOL", [1, 1]),
    }
    assert {o.name for o in sent.outputs} == {
        contract.TOP_ITEMS,
        contract.TOP_SCORES,
        contract.REASON_POSITIONS,
    }


@run_async
async def test_triton_down_gives_unavailable_promptly(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    config = _config(write_repository(tmp_path), triton_url=f"127.0.0.1:{closed_port}")
    server, port = create_server(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=10)
            elapsed = time.monotonic() - start
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
    finally:
        await server.stop(None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 3.0
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING


PLAINTEXT = {"LTREC_ALLOW_PLAINTEXT": "true"}


def test_event_loop_is_asyncio_unless_uvloop_is_asked_for_and_importable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert GatewayConfig(allow_plaintext=True).event_loop == "asyncio"
    assert event_loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert event_loop_factory("uvloop") is None
    assert "uvloop cannot be imported" in caplog.text
    with pytest.raises(ConfigError, match="LTREC_EVENT_LOOP must be one of"):
        GatewayConfig.from_env({**PLAINTEXT, "LTREC_EVENT_LOOP": "trio"})
    assert (
        GatewayConfig.from_env({**PLAINTEXT, "LTREC_EVENT_LOOP": " UVLOOP "}).event_loop == "uvloop"
    )


def test_coalescing_settings_are_read_and_bounded() -> None:
    assert GatewayConfig(allow_plaintext=True).triton_coalesce
    assert not GatewayConfig.from_env(
        {**PLAINTEXT, "LTREC_TRITON_COALESCE": "false"}
    ).triton_coalesce
    with pytest.raises(
        ConfigError, match=r"LTREC_TRITON_COALESCE_MAX_IN_FLIGHT must be in \[1, 64\], got 0"
    ):
        GatewayConfig.from_env({**PLAINTEXT, "LTREC_TRITON_COALESCE_MAX_IN_FLIGHT": "0"})
