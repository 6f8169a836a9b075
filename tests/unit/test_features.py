"""Training-time context buckets equal the gateway's, and sequences are cut per user."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ltrec.sequences import (
    build_sequences,
    build_vocabulary,
    context_matrix,
    label_buckets,
)
from ltrec_core import contract
from ltrec_core.context import time_buckets
from server.catalogue import ModelMetadata
from server.features import context_buckets
from server.gen.ltrec.v1 import recommender_pb2

# (epoch seconds, 1 + UTC hour, 1 + weekday with Monday = 0), worked out by hand:
KNOWN_TIMES = [
    # 1970-01-01 00:00:00 was a Thursday (weekday 3).
    (0, 1, 4),
    # 978300760 = 11322 days + 79960 s; 79960 s = 22:12:40; day 11322 -> (11322 + 3) % 7 = 6,
    # a Sunday: 2000-12-31 22:12:40.
    (978_300_760, 23, 7),
    # Sunday 1970-01-04 23:59:59 = 3 * 86400 + 86399.
    (345_599, 24, 7),
    # Monday 1970-01-05 00:00:00 = 4 * 86400.
    (345_600, 1, 1),
    # 1700000000 = 19675 days + 80000 s = 22:13:20; (19675 + 3) % 7 = 1: Tuesday 2023-11-14.
    (1_700_000_000, 23, 2),
    # Wednesday 1969-12-31 23:59:59: floor division, not truncation, before the epoch.
    (-1, 24, 3),
]

DEVICE_VOCAB = ["desktop", "mobile", "tablet"]
REGION_VOCAB = ["eu", "us"]


def metadata() -> ModelMetadata:
    return ModelMetadata(
        model_version="test",
        max_history=10,
        default_long_tail_weight=0.0,
        similar_items_default_long_tail_weight=0.0,
        long_tail_weight_max=2.0,
        event_types=contract.EVENT_TYPES,
        device_buckets={label: i + 1 for i, label in enumerate(DEVICE_VOCAB)},
        region_buckets={label: i + 1 for i, label in enumerate(REGION_VOCAB)},
    )


@pytest.mark.parametrize(("seconds", "hour", "weekday"), KNOWN_TIMES)
def test_time_buckets_match_hand_computed_values(seconds: int, hour: int, weekday: int) -> None:
    hours, weekdays = time_buckets(np.array([seconds]))
    assert (int(hours[0]), int(weekdays[0])) == (hour, weekday)
    assert hours.dtype == np.int64 and weekdays.dtype == np.int64


@pytest.mark.parametrize(("seconds", "hour", "weekday"), KNOWN_TIMES)
def test_gateway_context_buckets_match_training(seconds: int, hour: int, weekday: int) -> None:
    # Timestamp 0 on the wire means "now" (proto contract), so epoch 0 arrives as now = 0.
    context = recommender_pb2.Context(timestamp=seconds)
    got = context_buckets(context, metadata(), now_seconds=0.0)
    assert got[:2] == [hour, weekday]
    train_hour, train_weekday = time_buckets(np.array([seconds]))
    assert got[:2] == [int(train_hour[0]), int(train_weekday[0])]


def test_time_buckets_agree_over_a_week_of_hours() -> None:
    seconds = np.arange(0, 8 * 86400, 3600 + 17) + 1_600_000_000
    hours, weekdays = time_buckets(seconds)
    for s, h, w in zip(seconds, hours, weekdays, strict=True):
        got = context_buckets(recommender_pb2.Context(timestamp=int(s)), metadata(), 0.0)
        assert got[:2] == [int(h), int(w)], s
    assert set(hours.tolist()) == set(range(1, 25))
    assert set(weekdays.tolist()) == set(range(1, 8))


def test_vocabulary_is_normalised_deduplicated_and_sorted() -> None:
    values = pd.Series([" Mobile", "desktop", "MOBILE ", None, "", "  ", "Tablet", "desktop"])
    assert build_vocabulary(values) == ["desktop", "mobile", "tablet"]
    assert build_vocabulary(None) == []
    assert build_vocabulary(pd.Series([None, None])) == []


def test_label_buckets_map_unknown_and_missing_to_zero() -> None:
    values = pd.Series(["mobile", " Desktop ", "TABLET", "watch", None, "", np.nan])
    assert label_buckets(values, DEVICE_VOCAB, len(values)).tolist() == [2, 1, 3, 0, 0, 0, 0]
    assert label_buckets(None, DEVICE_VOCAB, 3).tolist() == [0, 0, 0]
    assert label_buckets(values, [], len(values)).tolist() == [0] * len(values)


def test_gateway_device_and_region_buckets_match_training() -> None:
    labels = [("Mobile ", "EU"), ("tablet", "us"), ("watch", "mars"), ("", "")]
    devices = label_buckets(pd.Series([d for d, _ in labels]), DEVICE_VOCAB, len(labels))
    regions = label_buckets(pd.Series([r for _, r in labels]), REGION_VOCAB, len(labels))
    for (device, region), want_device, want_region in zip(labels, devices, regions, strict=True):
        context = recommender_pb2.Context(timestamp=1, device=device, region=region)
        assert context_buckets(context, metadata(), 0.0)[2:] == [want_device, want_region]
    assert devices.tolist() == [2, 3, 0, 0]
    assert regions.tolist() == [1, 2, 0, 0]


def events_frame() -> pd.DataFrame:
    # Sorted by user, then time, as `load_dataset` returns events.
    return pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u2", "u3", "u3"],
            "item_id": ["a", "b", "c", "a", "c", "d"],
            "timestamp": [0, 3600, 345_600, 978_300_760, 10, 20],
            "event_type": ["view", "cart", "purchase", "view", "rating", "view"],
            "device": ["mobile", "Desktop", None, "tablet", "watch", "mobile"],
            "region": ["eu", "us", "us", None, "EU", "xx"],
            "item_index": [1, 2, 3, 1, 3, 4],
            "event_index": [1, 2, 3, 1, 4, 1],
        }
    )


def test_build_sequences_cuts_per_user() -> None:
    seqs = build_sequences(events_frame(), DEVICE_VOCAB, REGION_VOCAB)
    assert len(seqs) == 3
    assert seqs.users.tolist() == ["u1", "u2", "u3"]
    assert seqs.offsets.tolist() == [0, 3, 4, 6]
    assert seqs.offsets.dtype == np.int64
    assert seqs.items[seqs.user_slice(0)].tolist() == [1, 2, 3]
    assert seqs.items[seqs.user_slice(1)].tolist() == [1]
    assert seqs.items[seqs.user_slice(2)].tolist() == [3, 4]
    assert seqs.event_types[seqs.user_slice(2)].tolist() == [4, 1]
    # hour, weekday, device, region per event
    assert seqs.context.tolist() == [
        [1, 4, 2, 1],
        [2, 4, 1, 2],
        [1, 1, 0, 2],
        [23, 7, 3, 0],
        [1, 4, 0, 1],
        [1, 4, 2, 0],
    ]
    assert context_matrix(events_frame(), DEVICE_VOCAB, REGION_VOCAB).shape == (6, 4)


def test_build_sequences_without_device_or_region_columns() -> None:
    frame = events_frame().drop(columns=["device", "region"])
    seqs = build_sequences(frame, [], [])
    assert seqs.context[:, 2:].tolist() == [[0, 0]] * 6
    assert seqs.context[:, :2].tolist()[3] == [23, 7]


def test_build_sequences_of_no_events() -> None:
    seqs = build_sequences(events_frame().iloc[:0], DEVICE_VOCAB, REGION_VOCAB)
    assert len(seqs) == 0
    assert seqs.offsets.tolist() == [0]
    assert seqs.items.shape == (0,) and seqs.context.shape == (0, 4)
