"""Property-based fuzzing of every RPC: malformed and extreme requests get only documented codes.

The gateway runs once (its own event loop, in a thread) against the fake Triton of
`test_gateway`; hypothesis sends thousands of requests over a real gRPC channel.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import contract
from server.app import create_server
from server.config import GatewayConfig
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.unit.test_gateway import ITEMS, METADATA, FakeTransport, outputs, write_repository

MAX_K = 50
MAX_REQUEST_HISTORY = 20
MAX_EXCLUDE = 10
MAX_FEEDBACK_BATCH = 8
SERVED_VERSION = METADATA["model_version"]
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
KNOWN_IDS = [item_id for item_id, *_ in ITEMS]
ITEM_IDS = st.one_of(st.sampled_from(KNOWN_IDS), st.text(max_size=300))
SMALL_TIMESTAMPS = st.integers(min_value=0, max_value=4_000_000_000)

CONTEXTS = st.builds(
    recommender_pb2.Context,
    timestamp=st.one_of(SMALL_TIMESTAMPS, INT64),
    device=st.text(max_size=80),
    region=st.text(max_size=80),
)
FEEDBACK_EVENTS = st.builds(
    recommender_pb2.FeedbackEvent,
    request_id=st.one_of(st.text(max_size=140), st.from_regex(r"[a-z0-9-]{1,40}", fullmatch=True)),
    user_id=st.text(max_size=300),
    item_id=ITEM_IDS,
    type=st.integers(min_value=-2, max_value=8),
    timestamp=st.one_of(SMALL_TIMESTAMPS, INT64),
    position=st.one_of(st.none(), INT32, st.integers(min_value=-1, max_value=MAX_K + 1)),
    context=CONTEXTS,
)
EVENTS = st.builds(
    recommender_pb2.HistoryEvent,
    item_id=ITEM_IDS,
    event_type=st.integers(min_value=-2, max_value=8),  # proto3 enums are open: unknown values
    timestamp=st.one_of(SMALL_TIMESTAMPS, INT64),
)
REQUESTS = st.builds(
    recommender_pb2.RecommendRequest,
    user_id=st.text(max_size=300),
    history=st.lists(EVENTS, max_size=MAX_REQUEST_HISTORY + 3),
    context=CONTEXTS,
    k=st.one_of(st.integers(min_value=-2, max_value=MAX_K + 2), INT32),
    exclude_item_ids=st.lists(ITEM_IDS, max_size=MAX_EXCLUDE + 2),
    request_id=st.text(max_size=140),
    model_version=st.one_of(st.just(""), st.just(SERVED_VERSION), st.text(max_size=140)),
)
WEIGHTS = st.one_of(st.none(), st.floats(width=32, allow_nan=True, allow_infinity=True))


class RankingFake(FakeTransport):
    """Answers like the scorer: at most `top_k` items, never padding, history or exclusions."""

    async def infer(self, model_name, inputs, output_names, *, client_timeout, request_id):  # type: ignore[no-untyped-def]
        await super().infer(
            model_name, inputs, output_names, client_timeout=client_timeout, request_id=request_id
        )
        banned = set(inputs[contract.HISTORY_ITEMS].ravel()) | set(
            inputs[contract.EXCLUDE_ITEMS].ravel()
        )
        eligible = [i for i in range(1, len(ITEMS) + 1) if i not in banned]
        k = int(inputs[contract.TOP_K][0])
        ranked = (eligible + [0] * k)[:k]
        scores = [float(len(ITEMS) - n) if i else float("-inf") for n, i in enumerate(ranked)]
        return outputs(ranked, scores, [0] * k)


@pytest.fixture(scope="module")
def stub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[recommender_pb2_grpc.RecommenderStub]:
    root = tmp_path_factory.mktemp("fuzz")
    repository = write_repository(root / "model_repository")
    fake = RankingFake()
    config = GatewayConfig(
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        model_repository=repository,
        max_k=MAX_K,
        max_request_history=MAX_REQUEST_HISTORY,
        max_exclude=MAX_EXCLUDE,
        health_poll_interval_seconds=0.05,
        allow_plaintext=True,
        feedback_dir=root / "feedback",
        feedback_max_batch=MAX_FEEDBACK_BATCH,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[object, int]:
        server, port = create_server(config, transport=fake)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield recommender_pb2_grpc.RecommenderStub(channel)
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=REQUESTS, weight=WEIGHTS)
def test_any_request_gets_ok_invalid_argument_or_not_found(
    stub: recommender_pb2_grpc.RecommenderStub,
    request: recommender_pb2.RecommendRequest,
    weight: float | None,
) -> None:
    if weight is not None:
        request.long_tail_weight = weight
    try:
        reply = stub.Recommend(request, timeout=10)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:  # only for a version not served here
            assert request.model_version not in ("", SERVED_VERSION)
            assert "is not served here" in exc.details()
            return
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert exc.details(), "an INVALID_ARGUMENT must say which field and bound"
        return
    assert request.model_version in ("", SERVED_VERSION)
    # Accepted requests were within every documented bound.
    assert 1 <= request.k <= MAX_K
    assert len(request.history) <= MAX_REQUEST_HISTORY
    assert len(request.exclude_item_ids) <= MAX_EXCLUDE
    if weight is not None:
        assert math.isfinite(weight) and 0 <= weight <= 2
    assert len(reply.items) <= request.k
    assert all(item.item_id in KNOWN_IDS for item in reply.items)
    assert not {item.item_id for item in reply.items} & set(request.exclude_item_ids)


def _accepted_event(event: recommender_pb2.FeedbackEvent) -> bool:
    """The documented bounds of one feedback event."""
    request_id = event.request_id
    return (
        0 < len(request_id) <= 128
        and request_id.isascii()
        and request_id.isprintable()
        and 0 < len(event.user_id) <= 256
        and 0 < len(event.item_id) <= 256
        and 1 <= event.type <= 4
        and 0 <= event.timestamp <= 253_402_300_799
        and (not event.HasField("position") or 0 <= event.position < MAX_K)
        and 0 <= event.context.timestamp <= 253_402_300_799
        and len(event.context.device) <= 64
        and len(event.context.region) <= 64
    )


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=st.lists(FEEDBACK_EVENTS, max_size=MAX_FEEDBACK_BATCH + 2), single=st.booleans())
def test_any_feedback_gets_ok_or_invalid_argument(
    stub: recommender_pb2_grpc.RecommenderStub,
    events: list[recommender_pb2.FeedbackEvent],
    single: bool,
) -> None:
    try:
        if single and events:
            reply = stub.Feedback(recommender_pb2.FeedbackRequest(event=events[0]), timeout=10)
            events = events[:1]
        else:
            reply = stub.FeedbackBatch(
                recommender_pb2.FeedbackBatchRequest(events=events), timeout=10
            )
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert exc.details(), "an INVALID_ARGUMENT must say which field and bound"
        assert not (1 <= len(events) <= MAX_FEEDBACK_BATCH and all(map(_accepted_event, events)))
        return
    assert 1 <= len(events) <= MAX_FEEDBACK_BATCH
    assert all(map(_accepted_event, events)), events
    assert reply.accepted == len(events)
