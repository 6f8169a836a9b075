"""Which history a Recommend reads (the pipeline's `history` stage), and what the history store
keeps from requests and feedback.

The request's own history always wins when it has one. Without one, a request with a user_id
reads that user's stored history (`server.stores.history`); with neither, or nothing stored, or
the store unreachable, the model is asked without a history, as before there was a store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from server.features import EVENT_TYPE_NAMES, HistoryRow, history_rows
from server.gen.ltrec.v1 import recommender_pb2
from server.stores.history import HistoryStore, StoredEvent

# What a Feedback event adds to the user's history; impressions are exposure, not interest
# (as in retraining: clicks become views).
FEEDBACK_EVENT_TYPES: dict[int, str] = {
    recommender_pb2.FEEDBACK_TYPE_CLICK: "view",
    recommender_pb2.FEEDBACK_TYPE_CART: "cart",
    recommender_pb2.FEEDBACK_TYPE_PURCHASE: "purchase",
}
_EVENT_TYPE_VALUES: dict[str, recommender_pb2.EventType] = {
    "view": recommender_pb2.EVENT_TYPE_VIEW,
    "cart": recommender_pb2.EVENT_TYPE_CART,
    "purchase": recommender_pb2.EVENT_TYPE_PURCHASE,
    "rating": recommender_pb2.EVENT_TYPE_RATING,
}
SOURCE_NAMES: dict[recommender_pb2.HistorySource, str] = {
    recommender_pb2.HISTORY_SOURCE_REQUEST: "request",
    recommender_pb2.HISTORY_SOURCE_STORED: "stored",
    recommender_pb2.HISTORY_SOURCE_NONE: "none",
}


@dataclass(frozen=True)
class ChosenHistory:
    events: Sequence[HistoryRow]
    source: recommender_pb2.HistorySource


async def choose_history(
    request: recommender_pb2.RecommendRequest,
    store: HistoryStore | None,
    now: float,
    rows: Sequence[HistoryRow] | None = None,
) -> ChosenHistory:
    """Expects a validated request; `rows`: its history as validation read it (read here when
    None)."""
    if request.history:
        return ChosenHistory(
            history_rows(request.history) if rows is None else rows,
            recommender_pb2.HISTORY_SOURCE_REQUEST,
        )
    if request.user_id and store is not None:
        max_age = (
            request.stored_history_max_age_seconds
            if request.HasField("stored_history_max_age_seconds")
            else None
        )
        stored = await store.recent(request.user_id, now, max_age)
        if stored:
            return ChosenHistory(stored_rows(stored), recommender_pb2.HISTORY_SOURCE_STORED)
    return ChosenHistory((), recommender_pb2.HISTORY_SOURCE_NONE)


def stored_rows(stored: Iterable[StoredEvent]) -> list[HistoryRow]:
    """Stored events as the features read a request's (`server.features.HistoryRow`)."""
    return [
        (
            event.timestamp,
            event.item_id,
            _EVENT_TYPE_VALUES.get(event.event_type, recommender_pb2.EVENT_TYPE_VIEW),
        )
        for event in stored
    ]


def request_events(
    request: recommender_pb2.RecommendRequest, rows: Sequence[HistoryRow]
) -> list[tuple[str, StoredEvent]]:
    """A remembered request's events, oldest first, from `rows` (its history as validation
    read it: `server.features.history_rows`); those without a timestamp are left out (they
    cannot be placed in time, nor told from a repeat when the history is sent again)."""
    return [
        (request.user_id, StoredEvent(timestamp, EVENT_TYPE_NAMES[event_type], item_id))
        for timestamp, item_id, event_type in sorted(rows, key=lambda row: row[0])
        if timestamp > 0
    ]


def feedback_events(
    events: Iterable[recommender_pb2.FeedbackEvent], now: float
) -> list[tuple[str, StoredEvent]]:
    """The clicks, carts and purchases of validated feedback; no timestamp means `now`."""
    return [
        (
            event.user_id,
            StoredEvent(
                event.timestamp or int(now), FEEDBACK_EVENT_TYPES[event.type], event.item_id
            ),
        )
        for event in events
        if event.type in FEEDBACK_EVENT_TYPES
    ]
