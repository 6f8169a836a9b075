"""The gateway in-process against a fake Triton: a small model repository on disk, the fake
transport that stands in for tritonclient, and a running gateway to call (`running_gateway`).

Shared by the gateway's unit tests (`tests/unit/test_gateway*.py`, `test_items.py`,
`test_feedback.py`, `test_item_to_item.py`) and the feedback durability test.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from ltrec_core import contract
from server.app import GatewayServer, create_server
from server.config import GatewayConfig
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from server.logs import json_formatter

# (item_id, title, popularity, long_tail); catalogue index = position + 1.
ITEMS = [
    ("i1", "Toy Story (1995)", 500, 0),
    ("i2", 'Heat, "The" (1995)', 400, 0),
    ("i3", "Casino (1995)", 300, 0),
    ("i4", "Sabrina (1995)", 20, 1),
    ("i5", "Nixon, Part 2 (1995)", 10, 1),
    ("i6", "Balto (1995)", 5, 1),
]
# The catalogue file's (category, brand, price_bucket) of those items: what filters compare.
ITEM_FIELDS = {
    "i1": ("Films|Animation|Children's", "Pixar", "budget"),
    "i2": ("Films|Action|Crime", "Warner", "premium"),
    "i3": ("Films|Crime|Drama", "Universal", "mid-range"),
    "i4": ("Films|Comedy|Romance", "Paramount", "budget"),
    "i5": ("Films|Drama", "", ""),
    "i6": ("Films|Animation|Children's", "Universal", "premium"),
}
DIM = 4
METADATA = {
    "model_version": "20261129-ab12cd",
    "max_history": 3,
    "embedding_dim": DIM,
    "item_overlay": True,
    "item_filter": True,
    "basket_lookup": True,
    "audience": True,
    "model_config": {"text_max_tokens": 16},
    "default_long_tail_weight": 0.25,
    "similar_items_default_long_tail_weight": 0.01,
    "long_tail_weight_max": 2.0,
    "vocabularies": {
        "event_types": ["view", "cart", "purchase", "rating"],
        "device": ["desktop", "mobile"],
        "region": ["zip0", "zip1"],
    },
    "data": {"ignored": True},
    "hashes": {},
}


def write_tokenizer(directory: Path) -> None:
    """A tiny word-level tokenizer where the export writes MiniLM's (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = ["[PAD]", "[UNK]", ".", ":", ">", "category", "brand", "price", "toy", "space"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = directory / contract.ITEM_ENCODER_MODEL / contract.TOKENIZER_DIR
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))


def write_repository(
    directory: Path,
    items: Sequence[tuple[str, str, int, int]] = ITEMS,
    *,
    tokenizer: bool = True,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        write_tokenizer(directory)
    (directory / contract.METADATA_FILE).write_text(json.dumps(METADATA), encoding="utf-8")
    with (directory / contract.CATALOGUE_FILE).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(contract.CATALOGUE_COLUMNS)
        for index, (item_id, title, popularity, long_tail) in enumerate(items, start=1):
            fields = ITEM_FIELDS.get(item_id, ("", "", ""))
            writer.writerow([index, item_id, title, popularity, long_tail, *fields])
    return directory


def unpadded(indices: np.ndarray) -> list[list[int]]:
    """A padded index tensor the gateway sent ([1, L]: history, basket, exclusions) without its
    padding: what the request carries."""
    return [[int(i) for i in row if i != contract.PADDING_INDEX] for row in indices]


def outputs(items: list[int], scores: list[float], positions: list[int]) -> dict[str, np.ndarray]:
    return {
        contract.TOP_ITEMS: np.asarray([items], dtype=np.int64),
        contract.TOP_SCORES: np.asarray([scores], dtype=np.float32),
        contract.REASON_POSITIONS: np.asarray([positions], dtype=np.int64),
    }


@dataclass
class InferCall:
    model_name: str
    inputs: dict[str, np.ndarray]
    client_timeout: float
    request_id: str


RANKING_OUTPUTS = (contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS)


# What the fake user encoder and audience scorer read as the trained items' vectors (index 0 is
# padding): i1-i3 point one way ("action"), i4-i6 another ("drama").
FAKE_ITEM_TABLE = np.asarray(
    [
        [0.0, 0.0, 0.0, 0.0],
        [1.0, 0.1, 0.0, 0.0],
        [0.9, 0.0, 0.2, 0.0],
        [1.0, 0.0, 0.0, 0.1],
        [0.0, 1.0, 0.1, 0.0],
        [0.1, 0.9, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.2],
    ],
    dtype=np.float32,
)


def _rows(indices: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """The trained table's rows, then the overlay's (indices N+1..N+M), as the graphs gather."""
    return np.concatenate([FAKE_ITEM_TABLE, extra.reshape(-1, DIM)])[indices]


def _rows_per_row(indices: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """`_rows` of each row of `indices` [R, L] with its own overlay, `extra` [R, M, D] (the
    batching models' form)."""
    assert extra.ndim == 3 and len(extra) == len(indices), extra.shape
    return np.stack([_rows(row, row_extra) for row, row_extra in zip(indices, extra, strict=True)])


def fake_user_vectors(history: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """What the fake user encoder answers: 3 x the mean item vector of the (left-padded)
    history."""
    vectors = _rows_per_row(history, extra)
    real = (history != contract.PADDING_INDEX)[..., None]
    return (3.0 * (vectors * real).sum(axis=1) / np.maximum(real.sum(axis=1), 1)).astype(np.float32)


def fake_audience(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the fake audience ensemble answers: `ltrec.models.AudienceScorer` in numpy, over
    the fake table and the overlay, the users unweighted (the context weighting an identity)."""
    extra = inputs[contract.EXTRA_ITEM_VECTORS]
    query = _rows_per_row(inputs[contract.QUERY_ITEMS], inputs[contract.QUERY_EXTRA_ITEM_VECTORS])
    query = query[:, 0].astype(np.float64)
    users = inputs[contract.AUDIENCE_USERS].astype(np.float64)
    catalogue = np.concatenate([FAKE_ITEM_TABLE, extra.reshape(-1, DIM)]).astype(np.float64)
    logits = users @ catalogue.T
    logits[:, [contract.PADDING_INDEX, *inputs[contract.EXCLUDE_ITEMS].ravel()]] = -np.inf
    peak = logits.max(axis=1, keepdims=True)
    log_norm = (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))).T
    log_expected = query @ users.T - log_norm + np.log(inputs[contract.USER_ACTIVITY])[None, :]
    k = int(inputs[contract.TOP_K][0])
    top = np.argsort(-log_expected, axis=1, kind="stable")[:, :k]
    return {
        contract.AUDIENCE_TOP_USERS: top.astype(np.int64),
        contract.AUDIENCE_TOP_SCORES: np.exp(np.take_along_axis(log_expected, top, 1)).astype(
            np.float32
        ),
        contract.EXPECTED_INTERACTIONS: np.exp(log_expected).sum(axis=1).astype(np.float32),
    }


AUDIENCE_OUTPUTS = (
    contract.AUDIENCE_TOP_USERS,
    contract.AUDIENCE_TOP_SCORES,
    contract.EXPECTED_INTERACTIONS,
)
AUDIENCE_INPUTS = {
    contract.QUERY_ITEMS: np.int64,
    contract.AUDIENCE_USERS: np.float32,
    contract.CONTEXT: np.int64,
    contract.USER_ACTIVITY: np.float32,
    contract.EXCLUDE_ITEMS: np.int64,
    contract.TOP_K: np.int64,
    contract.EXTRA_ITEM_VECTORS: np.float32,
    contract.QUERY_EXTRA_ITEM_VECTORS: np.float32,
}


def check_audience_inputs(model_name: str, inputs: Mapping[str, np.ndarray]) -> None:
    """The fake's signatures of the user encoder and the audience ensemble, as exported."""
    if model_name == contract.USER_ENCODER_MODEL:
        assert set(inputs) == {
            contract.HISTORY_ITEMS,
            contract.HISTORY_EVENT_TYPES,
            contract.EXTRA_ITEM_VECTORS,
        }
        history = inputs[contract.HISTORY_ITEMS]
        assert history.dtype == np.int64 and history.ndim == 2 and len(history) >= 1
        assert inputs[contract.HISTORY_EVENT_TYPES].shape == history.shape
        assert inputs[contract.EXTRA_ITEM_VECTORS].shape[0] == len(history)  # per row
        return
    assert set(inputs) == set(AUDIENCE_INPUTS), set(inputs)
    for name, dtype in AUDIENCE_INPUTS.items():
        assert inputs[name].dtype == dtype, name
    users = len(inputs[contract.AUDIENCE_USERS])
    assert users >= 1 and inputs[contract.AUDIENCE_USERS].shape[1] == DIM
    assert inputs[contract.CONTEXT].shape == (users, len(contract.CONTEXT_FIELDS))
    assert inputs[contract.USER_ACTIVITY].shape == (users,)
    assert (inputs[contract.USER_ACTIVITY] >= 1).all()
    assert inputs[contract.EXCLUDE_ITEMS].shape[0] == 1
    assert 1 <= int(inputs[contract.TOP_K][0]) <= users
    assert inputs[contract.QUERY_ITEMS].shape[1] == 1
    assert len(inputs[contract.QUERY_EXTRA_ITEM_VECTORS]) == len(inputs[contract.QUERY_ITEMS])


def fake_item_vectors(input_ids: np.ndarray) -> np.ndarray:
    """What the fake item encoder answers: a vector that depends on the tokens."""
    seeds = input_ids.sum(axis=1, keepdims=True).astype(np.float32)
    return (np.arange(1, DIM + 1, dtype=np.float32) * (1.0 + seeds)).astype(np.float32)


def fake_image_features(images: np.ndarray) -> np.ndarray:
    """What the fake image encoder answers: features that depend on the pixels (never 0)."""
    means = images.mean(axis=(1, 2, 3)).astype(np.float32)[:, None]
    ramp = np.arange(1, contract.IMAGE_FEATURE_DIM + 1, dtype=np.float32) / 1000
    return (1.0 + means + ramp).astype(np.float32)


# What the item encoder takes: name -> (dtype, trailing shape or None for any).
ITEM_ENCODER_INPUTS: dict[str, tuple[type, tuple[int, ...] | None]] = {
    contract.TEXT_INPUT_IDS: (np.int64, None),
    contract.TEXT_ATTENTION_MASK: (np.int64, None),
    contract.IMAGE_FEATURES: (np.float32, (contract.IMAGE_FEATURE_DIM,)),
    contract.HAS_IMAGE: (np.float32, (1,)),
    contract.ATTRIBUTE_IDS: (np.int64, (contract.ATTRIBUTE_SLOTS,)),
}
IMAGE_SHAPE = (3, contract.IMAGE_SIZE, contract.IMAGE_SIZE)


def check_encoder_inputs(model_name: str, inputs: Mapping[str, np.ndarray]) -> None:
    """The fake's model signature: names, dtypes and shapes as the exported configs declare."""
    if model_name == contract.IMAGE_ENCODER_MODEL:
        (image,) = inputs.values()
        assert set(inputs) == {contract.IMAGE}
        assert image.dtype == np.float32 and image.shape[1:] == IMAGE_SHAPE and len(image) >= 1
        return
    assert set(inputs) == set(ITEM_ENCODER_INPUTS), set(inputs)
    rows = len(inputs[contract.TEXT_INPUT_IDS])
    for name, (dtype, trailing) in ITEM_ENCODER_INPUTS.items():
        array = inputs[name]
        assert array.dtype == dtype and array.ndim == 2 and len(array) == rows, name
        assert trailing is None or array.shape[1:] == trailing, (name, array.shape)


class FakeTransport:
    """Stands in for tritonclient: records each call, then answers, fails or stalls.

    The ranking ensembles (recommend, similar_items) answer `result`; the item encoder answers
    `fake_item_vectors` of its input ids (or `encoder_result` when set), the image encoder
    `fake_image_features` of its images (or `image_result`), the user encoder
    `fake_user_vectors` and the audience ensemble `fake_audience`.
    """

    def __init__(self, result: Mapping[str, np.ndarray] | None = None) -> None:
        self.result = dict(result) if result is not None else outputs([1], [1.0], [0])
        self.encoder_result: dict[str, np.ndarray] | None = None
        self.image_result: dict[str, np.ndarray] | None = None
        self.errors: list[BaseException] = []  # raised first, one per call
        self.always: BaseException | None = None
        self.delay_seconds = 0.0
        self.ready = True
        # The ensemble config's parameters (the served model's identity, `server.health`).
        self.parameters: dict[str, str] = {}
        self.closed = False
        self.calls: list[InferCall] = []

    async def infer(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        *,
        client_timeout: float,
        request_id: str,
    ) -> dict[str, np.ndarray]:
        if model_name == contract.ITEM_ENCODER_MODEL:
            assert tuple(output_names) == (contract.ITEM_VECTOR,)
            check_encoder_inputs(model_name, inputs)
        elif model_name == contract.IMAGE_ENCODER_MODEL:
            assert tuple(output_names) == (contract.IMAGE_FEATURES,)
            check_encoder_inputs(model_name, inputs)
        elif model_name == contract.USER_ENCODER_MODEL:
            assert tuple(output_names) == (contract.USER_EMBEDDING,)
            check_audience_inputs(model_name, inputs)
        elif model_name == contract.AUDIENCE_MODEL:
            assert tuple(output_names) == AUDIENCE_OUTPUTS
            check_audience_inputs(model_name, inputs)
        else:
            assert model_name in (contract.ENSEMBLE_MODEL, contract.SIMILAR_ITEMS_MODEL)
            assert tuple(output_names) == RANKING_OUTPUTS
        self.calls.append(InferCall(model_name, dict(inputs), client_timeout, request_id))
        if self.errors:
            raise self.errors.pop(0)
        if self.always is not None:
            raise self.always
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if model_name == contract.ITEM_ENCODER_MODEL:
            if self.encoder_result is not None:
                return self.encoder_result
            return {contract.ITEM_VECTOR: fake_item_vectors(inputs[contract.TEXT_INPUT_IDS])}
        if model_name == contract.IMAGE_ENCODER_MODEL:
            if self.image_result is not None:
                return self.image_result
            return {contract.IMAGE_FEATURES: fake_image_features(inputs[contract.IMAGE])}
        if model_name == contract.USER_ENCODER_MODEL:
            vectors = fake_user_vectors(
                inputs[contract.HISTORY_ITEMS], inputs[contract.EXTRA_ITEM_VECTORS]
            )
            return {contract.USER_EMBEDDING: vectors}
        if model_name == contract.AUDIENCE_MODEL:
            return fake_audience(inputs)
        rows = len(inputs[contract.TOP_K])  # a coalesced call (`server.coalesce`): rows alike
        return {name: np.repeat(array, rows, axis=0) for name, array in self.result.items()}

    def ranking_calls(self, model_name: str = contract.ENSEMBLE_MODEL) -> list[InferCall]:
        return [call for call in self.calls if call.model_name == model_name]

    async def is_model_ready(self, model_name: str, *, client_timeout: float) -> bool:
        assert model_name == contract.ENSEMBLE_MODEL
        return self.ready

    async def model_parameters(self, model_name: str, *, client_timeout: float) -> dict[str, str]:
        assert model_name == contract.ENSEMBLE_MODEL
        return dict(self.parameters)

    async def close(self) -> None:
        self.closed = True


def unavailable() -> InferenceServerException:
    return InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE")


@dataclass
class Gateway:
    server: GatewayServer
    channel: grpc.aio.Channel
    stub: recommender_pb2_grpc.RecommenderStub
    fake: FakeTransport
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def running_gateway(
    repository: Path, fake: FakeTransport, **config: Any
) -> AsyncIterator[Gateway]:
    settings: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "model_repository": repository,
        "triton_retry_backoff_seconds": 0.01,
        "health_poll_interval_seconds": 0.02,
        "allow_plaintext": True,
        # Every caller may call the admin RPCs, as on the local stack (tests/unit/test_access.py
        # tests the access control).
        "admin_auth": "allow-all",
        "feedback_dir": repository.parent / "feedback",
        "items_dir": repository.parent / "items",
        "history_sqlite_path": repository.parent / "history" / "history.sqlite3",
    }
    settings.update(config)
    server, port = create_server(GatewayConfig(**settings), transport=fake)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            yield Gateway(server, channel, stub, fake, port)
    finally:
        await server.stop(None)


def log_lines(caplog: pytest.LogCaptureFixture, event: str | None = None) -> list[dict[str, Any]]:
    """The captured records as the gateway's log writes them (JSON objects), those of one
    `event` (the access log's `rpc`, ...) when given."""
    formatter = json_formatter()
    lines = [json.loads(formatter.format(record)) for record in caplog.records]
    return [line for line in lines if event is None or line.get("event") == event]


def access_log(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The gateway's per-request JSON lines."""
    return log_lines(caplog, "rpc")


def run_async(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Runs an async test in its own event loop (no pytest asyncio plugin is installed)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=30))

    return wrapper


def event(item_id: str, event_type: int, timestamp: int) -> recommender_pb2.HistoryEvent:
    return recommender_pb2.HistoryEvent(item_id=item_id, event_type=event_type, timestamp=timestamp)


WEDNESDAY_1530_UTC = int(dt.datetime(2024, 1, 3, 15, 30, tzinfo=dt.UTC).timestamp())


def full_request() -> recommender_pb2.RecommendRequest:
    return recommender_pb2.RecommendRequest(
        user_id="user-42",
        history=[
            event("i1", recommender_pb2.EVENT_TYPE_PURCHASE, 300),
            event("not-in-catalogue", recommender_pb2.EVENT_TYPE_VIEW, 50),
            event("i2", recommender_pb2.EVENT_TYPE_UNSPECIFIED, 100),
            event("i3", recommender_pb2.EVENT_TYPE_CART, 100),  # tie: stays after i2
            event("i4", recommender_pb2.EVENT_TYPE_RATING, 0),  # unknown time: sorts first
        ],
        context=recommender_pb2.Context(
            timestamp=WEDNESDAY_1530_UTC, device=" Mobile ", region="zip9"
        ),
        k=10,
        exclude_item_ids=["i6", "unknown-exclusion", "i6"],
        request_id="req-123",
    )
