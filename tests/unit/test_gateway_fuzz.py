"""Property-based fuzzing of every RPC: malformed and extreme requests get only documented codes.

RecommendBatch gets random streams of the same random Recommend requests: each is answered
inline exactly as a Recommend of it is. Audience and ForecastDemand get random requests over
the users of the history store (and the users other properties' feedback adds).

The gateway runs once per module fixture (its own event loop, in a thread) against the fake
Triton of `test_gateway`; hypothesis sends thousands of requests over a real gRPC channel. The
item RPCs (UpsertItems, DeleteItems, SimilarItems) get a gateway of their own, so that the items
they add do not change what the Recommend properties call known.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltrec_core import contract
from server.app import create_server
from server.config import GatewayConfig
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.support.gateway import (
    ITEM_FIELDS,
    ITEMS,
    METADATA,
    FakeTransport,
    outputs,
    write_repository,
)
from tests.support.images import image_bytes, noise_png

MAX_K = 50
MAX_REQUEST_HISTORY = 20
MAX_EXCLUDE = 10
MAX_FEEDBACK_BATCH = 8
MAX_ITEM_BATCH = 6
MAX_FILTER_ITEM_IDS = 4
MAX_BASKET_ITEMS = 4
MAX_AUDIENCE_K = 20
MAX_AUDIENCE_USERS = 5
MAX_FORECAST_ITEMS = 4
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
    remember_history=st.booleans(),
)


def _label(text: str) -> str:
    return " ".join(text.split()).lower()


def _path(category: str) -> tuple[str, ...]:
    return tuple(p for p in (_label(part) for part in category.split("|")) if p)


def _values(valid: st.SearchStrategy, anything: st.SearchStrategy, bound: int) -> st.SearchStrategy:
    """A filter field: unset, only valid values (within its bound), or anything past it."""
    return st.one_of(
        st.just([]),
        st.lists(valid, min_size=1, max_size=bound),
        st.lists(st.one_of(valid, anything), min_size=1, max_size=bound + 1),
    )


# ItemFilters: values the catalogue has (in any case and spacing), values it does not, blank
# ones, open-enum price buckets, and lists past their bounds.
FILTERS = st.builds(
    recommender_pb2.ItemFilter,
    categories=_values(
        st.sampled_from(["Films", "Films|Animation", " films | CRIME ", "films|drama"]),
        st.one_of(st.sampled_from(["Films|Anim", "|", "", "x" * 513]), st.text(max_size=20)),
        3,
    ),
    brands=_values(
        st.sampled_from(["Universal", " pixar ", "WARNER", "Paramount"]),
        st.one_of(st.sampled_from(["Acme", " ", "b" * 257]), st.text(max_size=20)),
        3,
    ),
    price_buckets=_values(st.integers(1, 3), st.integers(min_value=-1, max_value=5), 3),
    available_only=st.booleans(),
    allow_item_ids=_values(st.sampled_from(KNOWN_IDS), ITEM_IDS, MAX_FILTER_ITEM_IDS),
    deny_item_ids=_values(st.sampled_from(KNOWN_IDS), ITEM_IDS, MAX_FILTER_ITEM_IDS),
)


def _filter_accepted(item_filter: recommender_pb2.ItemFilter) -> bool:
    """The documented bounds of an ItemFilter, and every value one the catalogue has."""
    paths = [_path(category) for category, _, _ in ITEM_FIELDS.values()]
    brands = {_label(brand) for _, brand, _ in ITEM_FIELDS.values()} - {""}
    ids = [*item_filter.allow_item_ids, *item_filter.deny_item_ids]
    return (
        len(item_filter.categories) <= 64
        and all(
            len(c) <= 512 and _path(c) and any(p[: len(_path(c))] == _path(c) for p in paths)
            for c in item_filter.categories
        )
        and len(item_filter.brands) <= 64
        and all(len(b) <= 256 and _label(b) in brands for b in item_filter.brands)
        and len(item_filter.price_buckets) <= 3
        and all(1 <= b <= 3 for b in item_filter.price_buckets)
        and len(item_filter.allow_item_ids) <= MAX_FILTER_ITEM_IDS
        and len(item_filter.deny_item_ids) <= MAX_FILTER_ITEM_IDS
        and all(i in KNOWN_IDS for i in ids)
    )


def _passes(item_id: str, item_filter: recommender_pb2.ItemFilter) -> bool:
    """Whether a trained item passes an accepted filter (an independent reading of the doc)."""
    category, brand, price = ITEM_FIELDS[item_id]
    path = _path(category)
    prices = {"budget": 1, "mid-range": 2, "premium": 3}
    return (
        (
            not item_filter.categories
            or any(path[: len(_path(c))] == _path(c) for c in item_filter.categories)
        )
        and (not item_filter.brands or _label(brand) in map(_label, item_filter.brands))
        and (not item_filter.price_buckets or prices.get(price) in item_filter.price_buckets)
        and (not item_filter.allow_item_ids or item_id in item_filter.allow_item_ids)
        and item_id not in item_filter.deny_item_ids
    )


RETENTION_SECONDS = 30 * 24 * 3600  # the gateway's default
MAX_AGES = st.one_of(st.none(), st.integers(min_value=-2, max_value=RETENTION_SECONDS + 2), INT64)
WEIGHTS = st.one_of(st.none(), st.floats(width=32, allow_nan=True, allow_infinity=True))


class RankingFake(FakeTransport):
    """Answers like the scorer: at most `top_k` items, never padding, history, exclusions or
    items the filter mask leaves out (for SimilarItems: never the query item); the item and
    image encoders answer like `FakeTransport`."""

    async def infer(self, model_name, inputs, output_names, *, client_timeout, request_id):  # type: ignore[no-untyped-def]
        answer = await super().infer(
            model_name, inputs, output_names, client_timeout=client_timeout, request_id=request_id
        )
        self.calls.clear()  # thousands of calls: keep none
        if model_name in (
            contract.ITEM_ENCODER_MODEL,
            contract.IMAGE_ENCODER_MODEL,
            contract.USER_ENCODER_MODEL,
            contract.AUDIENCE_MODEL,
        ):
            return answer
        history = inputs.get(contract.HISTORY_ITEMS, inputs.get(contract.QUERY_ITEMS))
        banned = set(history.ravel()) | set(inputs[contract.EXCLUDE_ITEMS].ravel())
        n_rows = len(ITEMS) + inputs[contract.EXTRA_ITEM_VECTORS].shape[1]  # [1, M, D]
        mask = inputs[contract.ITEM_ELIGIBLE]
        assert mask.dtype == bool and mask.shape in ((1, 1), (1, n_rows + 1)), mask.shape
        passes = mask[0] if mask.shape[1] > 1 else [True] * (n_rows + 1)
        eligible = [i for i in range(1, n_rows + 1) if i not in banned and passes[i]]
        k = int(inputs[contract.TOP_K][0, 0])
        ranked = (eligible + [0] * k)[:k]
        scores = [float(n_rows - n) if i else float("-inf") for n, i in enumerate(ranked)]
        return outputs(ranked, scores, [0] * k)


@contextlib.contextmanager
def fuzzed_gateway(root: Path, **settings: Any) -> Iterator[recommender_pb2_grpc.RecommenderStub]:
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
        max_filter_item_ids=MAX_FILTER_ITEM_IDS,
        max_basket_items=MAX_BASKET_ITEMS,
        health_poll_interval_seconds=0.05,
        allow_plaintext=True,
        admin_auth="allow-all",
        feedback_dir=root / "feedback",
        items_dir=root / "items",
        history_sqlite_path=root / "history" / "history.sqlite3",
        feedback_max_batch=MAX_FEEDBACK_BATCH,
        items_max_batch=MAX_ITEM_BATCH,
        audience_max_k=MAX_AUDIENCE_K,
        audience_max_users=MAX_AUDIENCE_USERS,
        forecast_max_items=MAX_FORECAST_ITEMS,
        **settings,
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


@pytest.fixture(scope="module")
def stub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[recommender_pb2_grpc.RecommenderStub]:
    with fuzzed_gateway(tmp_path_factory.mktemp("fuzz")) as stub:
        yield stub


@pytest.fixture(scope="module")
def items_stub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[recommender_pb2_grpc.RecommenderStub]:
    root = tmp_path_factory.mktemp("fuzz-items")
    (root / "images" / "shoes").mkdir(parents=True)
    (root / "images" / "shoes" / "a.png").write_bytes(VALID_IMAGES[0])
    (root / "secret.png").write_bytes(VALID_IMAGES[0])
    with fuzzed_gateway(root, image_root=root / "images") as stub:
        yield stub


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    request=REQUESTS,
    weight=WEIGHTS,
    max_age=MAX_AGES,
    item_filter=st.one_of(st.none(), FILTERS),
)
def test_any_request_gets_ok_invalid_argument_or_not_found(
    stub: recommender_pb2_grpc.RecommenderStub,
    request: recommender_pb2.RecommendRequest,
    weight: float | None,
    max_age: int | None,
    item_filter: recommender_pb2.ItemFilter | None,
) -> None:
    if weight is not None:
        request.long_tail_weight = weight
    if max_age is not None:
        request.stored_history_max_age_seconds = max_age
    if item_filter is not None:
        request.filter.CopyFrom(item_filter)
    try:
        reply = stub.Recommend(request, timeout=10)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:  # only for a version not served here
            assert request.model_version not in ("", SERVED_VERSION)
            assert "is not served here" in exc.details()
            return
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert exc.details(), "an INVALID_ARGUMENT must say which field and bound"
        if exc.details().startswith("filter"):  # only for a filter out of bounds or unknown
            assert not _filter_accepted(request.filter), exc.details()
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
    # Accepted filters were within bounds and known; only items that pass come back.
    assert _filter_accepted(request.filter)
    assert all(_passes(item.item_id, request.filter) for item in reply.items)
    if request.remember_history:
        assert request.user_id and request.history
    if max_age is not None:
        assert request.user_id and 1 <= max_age <= RETENTION_SECONDS
    if request.history:  # a request's own history always wins
        assert reply.history_source == recommender_pb2.HISTORY_SOURCE_REQUEST
    else:
        stored_or_none = (
            recommender_pb2.HISTORY_SOURCE_STORED,
            recommender_pb2.HISTORY_SOURCE_NONE,
        )
        assert reply.history_source in stored_or_none


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    item_filter=FILTERS,
    k=st.integers(min_value=1, max_value=MAX_K),
    history=st.lists(st.sampled_from(KNOWN_IDS), max_size=3),
    similar=st.booleans(),
)
def test_any_filter_gets_ok_exactly_when_accepted_and_k_items_that_pass(
    stub: recommender_pb2_grpc.RecommenderStub,
    item_filter: recommender_pb2.ItemFilter,
    k: int,
    history: list[str],
    similar: bool,
) -> None:
    """A valid request but for its filter: OK exactly when the filter is within bounds and every
    value is the catalogue's; then every item that passes (but the history or the query) comes
    back, up to k."""
    basket = list(dict.fromkeys(history))
    if similar and len(basket) >= 2:  # basket mode: none of the basket's items
        call = stub.SimilarItems
        request: Any = recommender_pb2.SimilarItemsRequest(
            basket_item_ids=basket, k=k, filter=item_filter
        )
        never = set(basket)
    elif similar:
        query = history[0] if history else KNOWN_IDS[0]
        call = stub.SimilarItems
        request = recommender_pb2.SimilarItemsRequest(item_id=query, k=k, filter=item_filter)
        never = {query}
    else:
        call = stub.Recommend
        request = recommender_pb2.RecommendRequest(
            k=k,
            history=[recommender_pb2.HistoryEvent(item_id=i) for i in history],
            filter=item_filter,
        )
        never = set(history)
    try:
        reply = call(request, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert exc.details().startswith("filter"), exc.details()
        assert not _filter_accepted(item_filter), exc.details()
        return
    assert _filter_accepted(item_filter)
    returned = [item.item_id for item in reply.items]
    eligible = [i for i in KNOWN_IDS if i not in never and _passes(i, item_filter)]
    assert sorted(returned) == sorted(eligible[:k]) and len(returned) == min(k, len(eligible))


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


# --- RecommendBatch ------------------------------------------------------------------------------

BATCH_MESSAGES = st.one_of(
    st.builds(recommender_pb2.RecommendBatchRequest, request=REQUESTS),
    st.just(recommender_pb2.RecommendBatchRequest()),  # no request: INVALID_ARGUMENT inline
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=st.lists(BATCH_MESSAGES, max_size=6))
def test_any_batch_stream_answers_every_request_as_recommend_would(
    stub: recommender_pb2_grpc.RecommenderStub,
    messages: list[recommender_pb2.RecommendBatchRequest],
) -> None:
    """The stream itself always ends OK; each request is answered once, inline, with what a
    Recommend of it answers: OK, or the same documented code and message."""
    answers = list(stub.RecommendBatch(iter(messages), timeout=10))
    assert sorted(answer.index for answer in answers) == list(range(len(messages)))
    for answer in answers:
        message = messages[answer.index]
        if not message.HasField("request"):
            assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            continue
        request = message.request
        try:
            single = stub.Recommend(request, timeout=10)
        except grpc.RpcError as exc:
            assert answer.WhichOneof("result") == "error", (exc.code(), request)
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            assert answer.error.code == exc.code().value[0]
            assert answer.error.message == exc.details()
            continue
        assert answer.WhichOneof("result") == "response", (answer.error, request)
        assert answer.request_id == answer.response.request_id
        if request.request_id:
            assert answer.request_id == single.request_id == request.request_id
        assert len(answer.response.items) <= request.k
        assert answer.response.model_version == single.model_version


# --- ForgetUser ----------------------------------------------------------------------------------


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    user_id=st.one_of(st.sampled_from(["", "u1", "x" * 256, "x" * 257]), st.text(max_size=300)),
    request_id=st.one_of(st.just(""), st.text(max_size=140)),
    with_feedback=st.booleans(),
)
def test_any_forget_user_gets_ok_or_invalid_argument_and_erases_at_once(
    stub: recommender_pb2_grpc.RecommenderStub,
    user_id: str,
    request_id: str,
    with_feedback: bool,
) -> None:
    accepted = (
        0 < len(user_id) <= 256
        and request_id.isascii()
        and request_id.isprintable()
        and len(request_id) <= 128
    )
    if with_feedback and 0 < len(user_id) <= 256:  # something to erase
        event = recommender_pb2.FeedbackEvent(
            request_id="fuzz", user_id=user_id, item_id=KNOWN_IDS[0], type=2, timestamp=0
        )
        stub.Feedback(recommender_pb2.FeedbackRequest(event=event), timeout=10)
    request = recommender_pb2.ForgetUserRequest(user_id=user_id, request_id=request_id)
    try:
        reply = stub.ForgetUser(request, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert exc.details() and not accepted
        return
    assert accepted
    if request_id:
        assert reply.request_id == request_id
    if with_feedback:
        assert reply.history_events_removed >= 1 and reply.feedback_records_erased >= 1
    # Erased at once: a Recommend with only the user id has no stored history.
    after = stub.Recommend(recommender_pb2.RecommendRequest(user_id=user_id, k=1), timeout=10)
    assert after.history_source == recommender_pb2.HISTORY_SOURCE_NONE


# --- Audience and ForecastDemand ----------------------------------------------------------------

AUDIENCE_USERS = [f"audience-user-{n}" for n in range(8)]
MAX_USERS = st.one_of(st.none(), st.integers(min_value=-2, max_value=MAX_AUDIENCE_USERS + 2), INT32)
AUDIENCE_REQUESTS = st.builds(
    recommender_pb2.AudienceRequest,
    item_id=ITEM_IDS,
    k=st.one_of(st.integers(min_value=-2, max_value=MAX_AUDIENCE_K + 2), INT32),
    request_id=st.text(max_size=140),
    model_version=st.one_of(st.just(""), st.just(SERVED_VERSION), st.text(max_size=140)),
    context=CONTEXTS,
)
FORECAST_REQUESTS = st.builds(
    recommender_pb2.ForecastDemandRequest,
    item_ids=st.lists(ITEM_IDS, max_size=MAX_FORECAST_ITEMS + 2),
    request_id=st.text(max_size=140),
    model_version=st.one_of(st.just(""), st.just(SERVED_VERSION), st.text(max_size=140)),
    context=CONTEXTS,
)


def _context_accepted(context: recommender_pb2.Context) -> bool:
    return (
        0 <= context.timestamp <= 253_402_300_799
        and len(context.device) <= 64
        and len(context.region) <= 64
    )


def _common_accepted(request: Any, max_users: int | None) -> bool:
    request_id = request.request_id
    return (
        request_id.isascii()
        and request_id.isprintable()
        and len(request_id) <= 128
        and len(request.model_version) <= 128
        and (max_users is None or 1 <= max_users <= MAX_AUDIENCE_USERS)
        and _context_accepted(request.context)
    )


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=AUDIENCE_REQUESTS, forecast=FORECAST_REQUESTS, max_users=MAX_USERS)
def test_any_audience_or_forecast_gets_only_documented_codes(
    stub: recommender_pb2_grpc.RecommenderStub,
    request: recommender_pb2.AudienceRequest,
    forecast: recommender_pb2.ForecastDemandRequest,
    max_users: int | None,
) -> None:
    """OK exactly when every bound holds and the items are known (NOT_FOUND: an unknown item or
    model version); then at most k users of the store, at most max_users scanned."""
    now = int(time.time())
    events = [
        recommender_pb2.FeedbackEvent(
            request_id="fuzz-audience", user_id=user, item_id=KNOWN_IDS[n % 6], type=2,
            timestamp=now - n,
        )
        for n, user in enumerate(AUDIENCE_USERS)
    ]  # fmt: skip
    stub.FeedbackBatch(recommender_pb2.FeedbackBatchRequest(events=events[:8]), timeout=10)
    if max_users is not None:
        request.max_users = max_users
        forecast.max_users = max_users
    bound = MAX_AUDIENCE_USERS if max_users is None else max_users
    accepted = _common_accepted(request, max_users) and 1 <= request.k <= MAX_AUDIENCE_K
    try:
        reply = stub.Audience(request, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
            exc.code(),
            exc.details(),
        )
        assert exc.details()
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            assert accepted and 0 < len(request.item_id) <= 256
            assert request.item_id not in KNOWN_IDS or request.model_version not in (
                "",
                SERVED_VERSION,
            )
        else:
            assert not (accepted and 0 < len(request.item_id) <= 256), exc.details()
    else:
        assert accepted and request.item_id in KNOWN_IDS
        assert request.model_version in ("", SERVED_VERSION)
        # (users other properties' feedback added, with an unknown item only, are not scanned)
        assert 0 <= reply.users_scanned <= bound
        assert len(reply.users) == min(request.k, reply.users_scanned)
        assert len({u.user_id for u in reply.users}) == len(reply.users)
        assert all(0 < len(u.user_id) <= 256 and u.history_events >= 1 for u in reply.users)
        assert reply.expected_interactions >= sum(u.expected_interactions for u in reply.users) * (
            1 - 1e-6
        )

    ids = list(forecast.item_ids)
    accepted = (
        _common_accepted(forecast, max_users)
        and 1 <= len(ids) <= MAX_FORECAST_ITEMS
        and all(0 < len(i) <= 256 for i in ids)
        and len(set(ids)) == len(ids)
    )
    try:
        demand = stub.ForecastDemand(forecast, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
            exc.code(),
            exc.details(),
        )
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            assert accepted
            assert not set(ids) <= set(KNOWN_IDS) or forecast.model_version not in (
                "",
                SERVED_VERSION,
            )
        else:
            assert not accepted, exc.details()
        return
    assert accepted and set(ids) <= set(KNOWN_IDS)
    assert [item.item_id for item in demand.items] == ids
    assert 0 <= demand.users_scanned <= bound
    assert all(item.expected_interactions >= 0 for item in demand.items)


# --- The item RPCs -----------------------------------------------------------------------------

NEW_IDS = st.sampled_from(["new-a", "new-b", "new-c"])
VALID_IMAGES = [
    image_bytes((5, 3)),
    image_bytes((1, 1), 7, "L", "GIF"),
    image_bytes((9, 4), (1, 2, 3, 4), "RGBA", "WEBP"),
    image_bytes((6, 6), fmt="JPEG"),
    noise_png((12, 10)),
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _mutated(data: bytes, position: int, value: int) -> bytes:
    position %= len(data)
    return data[:position] + bytes([value]) + data[position + 1 :]


# Whole images, cut ones, ones with a byte changed (headers, CRCs, pixels), and noise that
# starts like a PNG: none may take the gateway to anything but OK.
IMAGES = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.sampled_from(VALID_IMAGES),
    st.builds(lambda d, n: d[:n], st.sampled_from(VALID_IMAGES), st.integers(0, 200)),
    st.builds(_mutated, st.sampled_from(VALID_IMAGES), st.integers(0, 2**16), st.integers(0, 255)),
    st.builds(PNG_SIGNATURE.__add__, st.binary(max_size=64)),
)
IMAGE_PATHS = st.one_of(
    st.just(""),
    st.text(max_size=40),
    st.sampled_from(
        ["shoes/a.png", "shoes/../shoes/a.png", "../secret.png", "shoes", "/etc/passwd"]
    ),
    st.builds("https://cdn.example/{}".format, st.text(max_size=10)),
)
ITEMS_IDS = st.one_of(st.sampled_from(KNOWN_IDS), NEW_IDS, st.text(max_size=300))
ITEM_MESSAGES = st.builds(
    recommender_pb2.Item,
    item_id=ITEMS_IDS,
    title=st.one_of(st.just("A new film (2031)"), st.text(max_size=600)),
    description=st.one_of(st.just(""), st.text(max_size=200), st.just("d" * 10_001)),
    category=st.text(max_size=600),
    brand=st.text(max_size=300),
    price_bucket=st.integers(min_value=-1, max_value=5),
    attributes=st.dictionaries(st.text(max_size=70), st.text(max_size=40), max_size=3),
    image=IMAGES,
    image_path=IMAGE_PATHS,
    available=st.one_of(st.none(), st.booleans()),
)

# Valid items whose images are anything: these reach the image code in every example.
IMAGE_ITEMS = st.builds(
    recommender_pb2.Item,
    item_id=st.one_of(NEW_IDS, st.from_regex(r"img-[a-z0-9]{1,6}", fullmatch=True)),
    title=st.just("A pictured product"),
    category=st.sampled_from(["", "Shoes|Running", "a|b|c|d|e|f|g|h|i|j"]),
    brand=st.text(max_size=20),
    price_bucket=st.integers(min_value=0, max_value=3),
    image=IMAGES,
    image_path=IMAGE_PATHS,
)


def _accepted_query(request: recommender_pb2.SimilarItemsRequest) -> bool:
    """SimilarItems' query bounds: an item_id or a basket of 1..MAX_BASKET_ITEMS distinct ids,
    never both."""
    basket = request.basket_item_ids
    if not basket:
        return 0 < len(request.item_id) <= 256
    return (
        not request.item_id
        and len(basket) <= MAX_BASKET_ITEMS
        and len(set(basket)) == len(basket)
        and all(0 < len(i) <= 256 for i in basket)
    )


def _accepted_item(item: recommender_pb2.Item) -> bool:
    return (
        0 < len(item.item_id) <= 256
        and bool(item.title.strip())
        and len(item.title) <= 512
        and len(item.description) <= 10_000
        and len(item.category) <= 512
        and len(item.brand) <= 256
        and 0 <= item.price_bucket <= 3
        and all(0 < len(key) <= 64 and len(v) <= 1024 for key, v in item.attributes.items())
    )


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=st.one_of(
        st.lists(ITEM_MESSAGES, max_size=MAX_ITEM_BATCH + 2),
        st.lists(IMAGE_ITEMS, min_size=1, max_size=MAX_ITEM_BATCH, unique_by=lambda i: i.item_id),
    ),
    delete=st.lists(ITEMS_IDS, max_size=MAX_ITEM_BATCH + 2),
    similar=st.builds(
        recommender_pb2.SimilarItemsRequest,
        item_id=st.one_of(ITEMS_IDS, st.just("")),
        basket_item_ids=st.one_of(st.just([]), st.lists(ITEMS_IDS, max_size=MAX_BASKET_ITEMS + 2)),
        k=st.one_of(st.integers(min_value=-2, max_value=MAX_K + 2), INT32),
        exclude_item_ids=st.lists(ITEMS_IDS, max_size=MAX_EXCLUDE + 2),
        model_version=st.one_of(st.just(""), st.just(SERVED_VERSION), st.text(max_size=140)),
        filter=st.one_of(st.none(), FILTERS),
    ),
    weight=WEIGHTS,
)
def test_any_item_request_gets_only_documented_codes(
    items_stub: recommender_pb2_grpc.RecommenderStub,
    items: list[recommender_pb2.Item],
    delete: list[str],
    similar: recommender_pb2.SimilarItemsRequest,
    weight: float | None,
) -> None:
    # UpsertItems: OK exactly when every bound holds (ids distinct), else INVALID_ARGUMENT.
    accepted = (
        1 <= len(items) <= MAX_ITEM_BATCH
        and all(map(_accepted_item, items))
        and len({i.item_id for i in items}) == len(items)
    )
    try:
        reply = items_stub.UpsertItems(recommender_pb2.UpsertItemsRequest(items=items), timeout=10)
        assert accepted, items
        assert reply.upserted == len(items)
        # Every image is encoded or reported, never an error; images are optional.
        with_image = [i for i, item in enumerate(items) if item.image or item.image_path]
        assert reply.images_encoded + reply.images_not_encoded == len(with_image)
        assert len(reply.image_problems) == reply.images_not_encoded
        assert {p.index for p in reply.image_problems} <= set(with_image)
        assert all(p.reason.startswith(f"items[{p.index}].image") for p in reply.image_problems)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert exc.details() and not accepted

    # DeleteItems: INVALID_ARGUMENT out of bounds, NOT_FOUND for an id never seen, else OK.
    try:
        deleted = items_stub.DeleteItems(
            recommender_pb2.DeleteItemsRequest(item_ids=delete), timeout=10
        )
        assert 1 <= len(delete) <= MAX_ITEM_BATCH
        assert deleted.deleted == len(set(delete))
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
            exc.code(),
            exc.details(),
        )
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            assert "is not in the catalogue" in exc.details()
            assert 1 <= len(delete) <= MAX_ITEM_BATCH and all(0 < len(i) <= 256 for i in delete)

    # SimilarItems: INVALID_ARGUMENT out of bounds, NOT_FOUND for an unknown, hidden or
    # unserved thing, else at most k items, never the query or an exclusion.
    if weight is not None:
        similar.long_tail_weight = weight
    try:
        reply = items_stub.SimilarItems(similar, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
            exc.code(),
            exc.details(),
        )
        assert exc.details()
        if exc.code() == grpc.StatusCode.NOT_FOUND and "is not in the catalogue" in exc.details():
            assert _accepted_query(similar)
        return
    assert _accepted_query(similar)
    assert similar.model_version in ("", SERVED_VERSION)
    assert 1 <= similar.k <= MAX_K and len(similar.exclude_item_ids) <= MAX_EXCLUDE
    if weight is not None:
        assert math.isfinite(weight) and 0 <= weight <= 2
    returned = [item.item_id for item in reply.items]
    assert len(returned) <= similar.k
    assert similar.item_id not in returned
    assert not set(returned) & set(similar.basket_item_ids)
    assert not set(returned) & set(similar.exclude_item_ids)
    # Whatever the upserts above did to the items' fields, a filter's id lists hold.
    if similar.filter.allow_item_ids:
        assert set(returned) <= set(similar.filter.allow_item_ids)
    assert not set(returned) & set(similar.filter.deny_item_ids)
