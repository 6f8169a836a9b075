"""The gateway's request path read once: validation hands the history rows it read to the
features, stored events become the same rows, the time buckets in integers equal the training
arrays, and the response keeps the filter, the padding and the reasons."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ltrec_core import contract
from ltrec_core.context import time_bucket, time_buckets
from server.catalogue import Catalogue, ModelMetadata
from server.errors import BackendError
from server.features import build_features, history_rows
from server.gen.ltrec.v1 import recommender_pb2
from server.history import request_events, stored_rows
from server.postprocess import build_items
from server.stores.history import StoredEvent
from server.validation import RequestLimits, validate_request

LIMITS = RequestLimits(max_k=100, max_history=50, max_exclude=50, long_tail_weight_max=2.0)
N = 8


def catalogue() -> Catalogue:
    ids = ["", *[f"i{i}" for i in range(1, N + 1)]]
    return Catalogue(
        item_ids=ids,
        titles=["", *[f"Title {i}" for i in range(1, N + 1)]],
        popularity=np.arange(N + 1, dtype=np.int64),
        long_tail=np.asarray([False, *[i > 4 for i in range(1, N + 1)]]),
        index_of={item: i for i, item in enumerate(ids) if i},
        trained_size=N,
    )


def metadata() -> ModelMetadata:
    return ModelMetadata(
        model_version="test",
        max_history=4,
        default_long_tail_weight=0.0,
        similar_items_default_long_tail_weight=0.0,
        long_tail_weight_max=2.0,
        event_types=contract.EVENT_TYPES,
        device_buckets={},
        region_buckets={},
    )


def request() -> recommender_pb2.RecommendRequest:
    event = recommender_pb2.HistoryEvent
    return recommender_pb2.RecommendRequest(
        k=3,
        history=[
            event(item_id="i3", event_type=recommender_pb2.EVENT_TYPE_PURCHASE, timestamp=30),
            event(item_id="unknown", event_type=recommender_pb2.EVENT_TYPE_VIEW, timestamp=5),
            event(item_id="i1", event_type=recommender_pb2.EVENT_TYPE_VIEW, timestamp=10),
            event(item_id="i2", event_type=recommender_pb2.EVENT_TYPE_CART, timestamp=10),
            event(item_id="i5", event_type=recommender_pb2.EVENT_TYPE_VIEW, timestamp=0),
            event(item_id="i6", event_type=recommender_pb2.EVENT_TYPE_RATING, timestamp=40),
        ],
        context=recommender_pb2.Context(timestamp=1_700_000_000),
    )


def test_validation_returns_the_rows_it_read_and_the_features_read_them_alike() -> None:
    req = request()
    rows = validate_request(req, LIMITS)
    assert rows == history_rows(req.history)
    assert rows[0] == (30, "i3", recommender_pb2.EVENT_TYPE_PURCHASE)
    given = build_features(req, metadata(), catalogue(), 0.0, rows)
    own = build_features(req, metadata(), catalogue(), 0.0)
    for name, array in own.as_inputs().items():
        np.testing.assert_array_equal(given.as_inputs()[name], array, err_msg=name)
    # Oldest first, ties in the given order, the unknown id skipped, the last max_history kept.
    assert given.history_items.tolist() == [[1, 2, 3, 6]]
    assert given.history_event_types.tolist()[0][-1] == 1 + contract.EVENT_TYPES.index("rating")
    assert given.skipped_history_items == 1 and given.history_events == 4
    assert rows == history_rows(req.history)  # the caller's rows are not reordered


def test_remembered_events_come_from_the_validated_rows_alike() -> None:
    req = request()
    req.user_id = "u1"
    rows = validate_request(req, LIMITS)
    remembered = request_events(req, rows)
    # the request's own events, as a second reading of the message would give them
    ordered = sorted(req.history, key=lambda event: event.timestamp)
    assert [(event.timestamp, event.item_id) for _, event in remembered] == [
        (event.timestamp, event.item_id) for event in ordered if event.timestamp > 0
    ]
    # oldest first, the event without a timestamp left out
    assert [event.item_id for _, event in remembered] == ["unknown", "i1", "i2", "i3", "i6"]
    assert {user for user, _ in remembered} == {"u1"}


def test_an_invalid_event_is_still_named_by_its_position() -> None:
    req = request()
    req.history[3].item_id = ""
    with pytest.raises(Exception, match=r"history\[3\]\.item_id must be non-empty"):
        validate_request(req, LIMITS)


def test_stored_events_become_the_same_rows() -> None:
    stored = [StoredEvent(20, "cart", "i4"), StoredEvent(10, "purchase", "i2")]
    assert stored_rows(stored) == [
        (20, "i4", recommender_pb2.EVENT_TYPE_CART),
        (10, "i2", recommender_pb2.EVENT_TYPE_PURCHASE),
    ]
    req = recommender_pb2.RecommendRequest(k=3)
    features = build_features(req, metadata(), catalogue(), 0.0, stored_rows(stored))
    assert features.history_items.tolist() == [[0, 0, 2, 4]]


@pytest.mark.parametrize("seconds", [0.0, 0.999, -0.5, -1.0, 345_599.9, 1_700_000_000.25])
def test_one_moment_buckets_like_the_training_arrays(seconds: float) -> None:
    hours, weekdays = time_buckets(np.array([math.floor(seconds)]))
    assert time_bucket(seconds) == (int(hours[0]), int(weekdays[0]))


def test_one_moment_buckets_over_a_year_of_random_times() -> None:
    seconds = np.random.default_rng(0).uniform(-1e8, 4e9, size=2000)
    hours, weekdays = time_buckets(np.floor(seconds).astype(np.int64))
    got = [time_bucket(float(s)) for s in seconds]
    assert got == list(zip(hours.tolist(), weekdays.tolist(), strict=True))


def outputs(items: list[int], scores: list[float], positions: list[int]) -> dict[str, np.ndarray]:
    return {
        contract.TOP_ITEMS: np.asarray([items], dtype=np.int64),
        contract.TOP_SCORES: np.asarray([scores], dtype=np.float32),
        contract.REASON_POSITIONS: np.asarray([positions], dtype=np.int64),
    }


def test_response_keeps_k_drops_padding_history_and_filtered_items_and_gives_reasons() -> None:
    req = request()
    req.k = 5
    features = build_features(req, metadata(), catalogue(), 0.0)
    ranked = outputs([7, 3, 8, 5, 4, 2], [9.0, 8.0, 7.0, -math.inf, 5.0, 4.0], [3, 0, -1, 0, 0, 1])
    items = build_items(ranked, features, catalogue())
    # i3 is in the history, the -inf row is padding, k = 5 cuts i2.
    assert [item.item_id for item in items] == ["i7", "i8", "i4"]
    assert items[0].reason == 'Because you rated "Title 6"'
    assert items[1].reason == "A long-tail pick" and items[1].long_tail
    assert items[2].reason == 'Because you viewed "Title 1"'
    assert items[0].title == "Title 7" and items[0].score == pytest.approx(9.0)

    eligible = np.zeros((1, N + 1), dtype=np.bool_)
    eligible[0, [4, 8]] = True
    filtered = build_features(req, metadata(), catalogue(), 0.0)
    object.__setattr__(filtered, "item_eligible", eligible)
    assert [i.item_id for i in build_items(ranked, filtered, catalogue())] == ["i8", "i4"]


def test_an_index_outside_the_catalogue_is_a_backend_error() -> None:
    features = build_features(request(), metadata(), catalogue(), 0.0)
    with pytest.raises(BackendError, match=r"outside \[1, 8\]"):
        build_items(outputs([N + 1], [1.0], [0]), features, catalogue())
