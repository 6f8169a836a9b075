"""Request validation: every message names the field and its bound, e.g. `k must be in [1, 500]`.

Runs before any feature is built, so that later stages may trust lengths, enums and ranges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.unknown_fields import UnknownFieldSet

from ltrec_core.item_attributes import category_path, label
from server.errors import InvalidArgument
from server.features import HistoryRow, history_rows
from server.gen.ltrec.v1 import recommender_pb2

MAX_USER_ID_CHARS = 256
MAX_ITEM_ID_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
MAX_CONTEXT_LABEL_CHARS = 64
# 9999-12-31T23:59:59Z: beyond it a timestamp cannot be turned into an hour and a weekday.
MAX_TIMESTAMP_SECONDS = 253_402_300_799
# UpsertItems item fields.
MAX_TITLE_CHARS = 512
MAX_DESCRIPTION_CHARS = 10_000
MAX_CATEGORY_CHARS = 512
MAX_BRAND_CHARS = 256
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 1024
MAX_IMAGE_BYTES = 1024 * 1024
MAX_IMAGE_PATH_CHARS = 1024
# ItemFilter: categories and brands per request.
MAX_FILTER_VALUES = 64

_EVENT_TYPES = frozenset(recommender_pb2.EventType.values())
_FEEDBACK_TYPES = frozenset(recommender_pb2.FeedbackType.values()) - {
    recommender_pb2.FEEDBACK_TYPE_UNSPECIFIED
}
_PRICE_BUCKETS = frozenset(recommender_pb2.PriceBucket.values())
_FILTER_PRICE_BUCKETS = _PRICE_BUCKETS - {recommender_pb2.PRICE_BUCKET_UNSPECIFIED}


@dataclass(frozen=True)
class RequestLimits:
    max_k: int
    max_history: int
    max_exclude: int
    long_tail_weight_max: float
    max_feedback_batch: int = 1000
    # Items per UpsertItems call, ids per DeleteItems call.
    max_item_batch: int = 64
    # The history store: whether there is one (LTREC_HISTORY_STORE is not off) and how far back
    # it keeps events (the bound of stored_history_max_age_seconds).
    history_store: bool = True
    history_retention_seconds: int = 30 * 24 * 3600
    # Ids per ItemFilter.allow_item_ids and per ItemFilter.deny_item_ids.
    max_filter_item_ids: int = 1000
    # SimilarItems' basket mode: ids per basket_item_ids, and whether the model repository's item
    # lookup takes a basket at all (exported with it).
    max_basket_items: int = 50
    basket_lookup: bool = True
    # Audience's k, users scanned per Audience or ForecastDemand, items per ForecastDemand.
    max_audience_k: int = 1000
    max_audience_users: int = 10_000
    max_forecast_items: int = 100


def validate_request(
    request: recommender_pb2.RecommendRequest, limits: RequestLimits
) -> list[HistoryRow]:
    """Raises InvalidArgument for the first field out of bounds. Returns the request's history
    as it read it (`history_rows`), for `build_features`, which then reads no event again."""
    _max_chars("user_id", request.user_id, MAX_USER_ID_CHARS)
    _request_id("request_id", request.request_id)
    _max_chars("model_version", request.model_version, MAX_REQUEST_ID_CHARS)

    _k(request.k, limits)

    if len(request.history) > limits.max_history:
        raise InvalidArgument(
            f"history must have at most {limits.max_history} events, got {len(request.history)}"
        )
    rows = history_rows(request.history)
    for position, (timestamp, item_id, event_type) in enumerate(rows):
        # The rules checked without naming the field; a failing event is checked again,
        # field by field, for the error that names it.
        if not (_item_id_ok(item_id) and event_type in _EVENT_TYPES and _timestamp_ok(timestamp)):
            _history_event(position, request.history[position])

    _exclusions(request.exclude_item_ids, limits)
    _long_tail_weight(request, limits)
    _context("context", request.context)
    _history_options(request, limits)
    if request.HasField("filter"):  # unset: nothing to check, unknown fields included
        _item_filter("filter", request.filter, limits)
    return rows


def _history_event(position: int, event: recommender_pb2.HistoryEvent) -> None:
    field = f"history[{position}]"
    _item_id(f"{field}.item_id", event.item_id)
    if event.event_type not in _EVENT_TYPES:
        raise InvalidArgument(
            f"{field}.event_type must be a defined EventType, got {event.event_type}"
        )
    _timestamp(f"{field}.timestamp", event.timestamp)


def _history_options(request: recommender_pb2.RecommendRequest, limits: RequestLimits) -> None:
    if request.remember_history:
        if not request.user_id:
            raise InvalidArgument(
                "user_id must be non-empty when remember_history is set (whose history to keep)"
            )
        if not request.history:
            raise InvalidArgument("history must be non-empty when remember_history is set")
        if not limits.history_store:
            raise InvalidArgument(
                "remember_history cannot be set: this gateway keeps no user history "
                "(LTREC_HISTORY_STORE=off)"
            )
    if request.HasField("stored_history_max_age_seconds"):
        age = request.stored_history_max_age_seconds
        bound = limits.history_retention_seconds
        if not 1 <= age <= bound:
            raise InvalidArgument(
                f"stored_history_max_age_seconds must be in [1, {bound}] (the retention), got {age}"
            )
        if not request.user_id:
            raise InvalidArgument(
                "user_id must be non-empty when stored_history_max_age_seconds is set "
                "(whose stored history to read)"
            )


def validate_similar_request(
    request: recommender_pb2.SimilarItemsRequest, limits: RequestLimits
) -> None:
    _request_id("request_id", request.request_id)
    _max_chars("model_version", request.model_version, MAX_REQUEST_ID_CHARS)
    _similar_query(request, limits)
    _k(request.k, limits)
    _exclusions(request.exclude_item_ids, limits)
    _long_tail_weight(request, limits)
    if request.HasField("filter"):  # unset: nothing to check, unknown fields included
        _item_filter("filter", request.filter, limits)


def _similar_query(request: recommender_pb2.SimilarItemsRequest, limits: RequestLimits) -> None:
    """One item (item_id) or a basket (basket_item_ids), never both: a request with both would
    leave unsaid whether item_id belongs to the basket."""
    basket = request.basket_item_ids
    if not basket:
        if not request.item_id:
            raise InvalidArgument(
                "item_id must be non-empty, or basket_item_ids set (the item, or the basket, to "
                "find related items for)"
            )
        _item_id("item_id", request.item_id)
        return
    if request.item_id:
        raise InvalidArgument(
            "item_id and basket_item_ids are mutually exclusive: set one (a basket of one item "
            "answers as its item_id)"
        )
    if not limits.basket_lookup:
        raise InvalidArgument(
            "basket_item_ids cannot be set: this model repository was exported before "
            "SimilarItems took baskets (basket_lookup); re-run the export"
        )
    if len(basket) > limits.max_basket_items:
        raise InvalidArgument(
            f"basket_item_ids must have at most {limits.max_basket_items} ids, got {len(basket)}"
        )
    first: dict[str, int] = {}
    for position, item_id in enumerate(basket):
        _item_id(f"basket_item_ids[{position}]", item_id)
        if item_id in first:
            raise InvalidArgument(
                f"basket_item_ids[{position}] repeats basket_item_ids[{first[item_id]}] (ids "
                "must be distinct)"
            )
        first[item_id] = position


def validate_upsert_request(
    request: recommender_pb2.UpsertItemsRequest, limits: RequestLimits
) -> None:
    """Raises InvalidArgument for the first field out of bounds, e.g. `items[2].title`."""
    _request_id("request_id", request.request_id)
    items = request.items
    if not 1 <= len(items) <= limits.max_item_batch:
        raise InvalidArgument(
            f"items must have between 1 and {limits.max_item_batch} items, got {len(items)}"
        )
    first: dict[str, int] = {}
    for position, item in enumerate(items):
        field = f"items[{position}]"
        _item_id(f"{field}.item_id", item.item_id)
        if item.item_id in first:
            raise InvalidArgument(
                f"{field}.item_id repeats items[{first[item.item_id]}].item_id (ids must be "
                "distinct)"
            )
        first[item.item_id] = position
        if not item.title.strip():
            raise InvalidArgument(f"{field}.title must be non-empty")
        _max_chars(f"{field}.title", item.title, MAX_TITLE_CHARS)
        _max_chars(f"{field}.description", item.description, MAX_DESCRIPTION_CHARS)
        _max_chars(f"{field}.category", item.category, MAX_CATEGORY_CHARS)
        _max_chars(f"{field}.brand", item.brand, MAX_BRAND_CHARS)
        if item.price_bucket not in _PRICE_BUCKETS:
            raise InvalidArgument(
                f"{field}.price_bucket must be a defined PriceBucket, got {item.price_bucket}"
            )
        if len(item.attributes) > MAX_ATTRIBUTES:
            raise InvalidArgument(
                f"{field}.attributes must have at most {MAX_ATTRIBUTES} entries, "
                f"got {len(item.attributes)}"
            )
        for key in sorted(item.attributes):
            if not key:
                raise InvalidArgument(f"{field}.attributes keys must be non-empty")
            _max_chars(f"{field}.attributes key", key, MAX_ATTRIBUTE_KEY_CHARS)
            _max_chars(
                f"{field}.attributes[{key!r}]", item.attributes[key], MAX_ATTRIBUTE_VALUE_CHARS
            )
        if len(item.image) > MAX_IMAGE_BYTES:
            raise InvalidArgument(
                f"{field}.image must be at most {MAX_IMAGE_BYTES} bytes, got {len(item.image)}"
            )
        _max_chars(f"{field}.image_path", item.image_path, MAX_IMAGE_PATH_CHARS)


def validate_delete_request(
    request: recommender_pb2.DeleteItemsRequest, limits: RequestLimits
) -> None:
    _request_id("request_id", request.request_id)
    ids = request.item_ids
    if not 1 <= len(ids) <= limits.max_item_batch:
        raise InvalidArgument(
            f"item_ids must have between 1 and {limits.max_item_batch} ids, got {len(ids)}"
        )
    for position, item_id in enumerate(ids):
        _item_id(f"item_ids[{position}]", item_id)


def validate_forget_request(request: recommender_pb2.ForgetUserRequest) -> None:
    _request_id("request_id", request.request_id)
    if not request.user_id:
        raise InvalidArgument("user_id must be non-empty (the user to forget)")
    _max_chars("user_id", request.user_id, MAX_USER_ID_CHARS)


def validate_audience_request(
    request: recommender_pb2.AudienceRequest, limits: RequestLimits
) -> None:
    _request_id("request_id", request.request_id)
    _max_chars("model_version", request.model_version, MAX_REQUEST_ID_CHARS)
    _item_id("item_id", request.item_id)
    if not 1 <= request.k <= limits.max_audience_k:
        raise InvalidArgument(f"k must be in [1, {limits.max_audience_k}], got {request.k}")
    _max_users(request, limits)
    _context("context", request.context)


def validate_forecast_request(
    request: recommender_pb2.ForecastDemandRequest, limits: RequestLimits
) -> None:
    _request_id("request_id", request.request_id)
    _max_chars("model_version", request.model_version, MAX_REQUEST_ID_CHARS)
    ids = request.item_ids
    if not 1 <= len(ids) <= limits.max_forecast_items:
        raise InvalidArgument(
            f"item_ids must have between 1 and {limits.max_forecast_items} ids, got {len(ids)}"
        )
    first: dict[str, int] = {}
    for position, item_id in enumerate(ids):
        _item_id(f"item_ids[{position}]", item_id)
        if item_id in first:
            raise InvalidArgument(
                f"item_ids[{position}] repeats item_ids[{first[item_id]}] (ids must be distinct)"
            )
        first[item_id] = position
    _max_users(request, limits)
    _context("context", request.context)


def max_users(
    request: recommender_pb2.AudienceRequest | recommender_pb2.ForecastDemandRequest,
    limits: RequestLimits,
) -> int:
    """The users a validated request scans: its max_users, else the gateway's."""
    return request.max_users if request.HasField("max_users") else limits.max_audience_users


def _max_users(
    request: recommender_pb2.AudienceRequest | recommender_pb2.ForecastDemandRequest,
    limits: RequestLimits,
) -> None:
    if request.HasField("max_users") and not 1 <= request.max_users <= limits.max_audience_users:
        raise InvalidArgument(
            f"max_users must be in [1, {limits.max_audience_users}], got {request.max_users}"
        )


def validate_feedback_events(
    events: Sequence[recommender_pb2.FeedbackEvent], field: str, limits: RequestLimits
) -> None:
    """Raises InvalidArgument for the first field out of bounds, e.g. `events[3].item_id`."""
    if not 1 <= len(events) <= limits.max_feedback_batch:
        raise InvalidArgument(
            f"{field} must have between 1 and {limits.max_feedback_batch} events, got {len(events)}"
        )
    for position, event in enumerate(events):
        validate_feedback_event(event, f"{field}[{position}]", limits)


def validate_feedback_event(
    event: recommender_pb2.FeedbackEvent, field: str, limits: RequestLimits
) -> None:
    _request_id(f"{field}.request_id", event.request_id)
    if not event.request_id:
        raise InvalidArgument(f"{field}.request_id must be non-empty (the served list's id)")
    if not event.user_id:
        raise InvalidArgument(f"{field}.user_id must be non-empty")
    _max_chars(f"{field}.user_id", event.user_id, MAX_USER_ID_CHARS)
    _item_id(f"{field}.item_id", event.item_id)
    if event.type not in _FEEDBACK_TYPES:
        raise InvalidArgument(
            f"{field}.type must be one of IMPRESSION, CLICK, CART, PURCHASE, got {event.type}"
        )
    _timestamp(f"{field}.timestamp", event.timestamp)
    if event.HasField("position") and not 0 <= event.position < limits.max_k:
        raise InvalidArgument(
            f"{field}.position must be in [0, {limits.max_k - 1}], got {event.position}"
        )
    _context(f"{field}.context", event.context)


def _k(k: int, limits: RequestLimits) -> None:
    if not 1 <= k <= limits.max_k:
        raise InvalidArgument(f"k must be in [1, {limits.max_k}], got {k}")


def _exclusions(item_ids: Sequence[str], limits: RequestLimits) -> None:
    if len(item_ids) > limits.max_exclude:
        raise InvalidArgument(
            f"exclude_item_ids must have at most {limits.max_exclude} ids, got {len(item_ids)}"
        )
    for position, item_id in enumerate(item_ids):
        if not _item_id_ok(item_id):
            _item_id(f"exclude_item_ids[{position}]", item_id)


def _item_filter(
    field: str, item_filter: recommender_pb2.ItemFilter, limits: RequestLimits
) -> None:
    """Bounds and shapes; whether the catalogue has the values is `server.item_filter`'s check."""
    unknown = sorted({f.field_number for f in UnknownFieldSet(item_filter)})
    if unknown:
        numbers = ", ".join(map(str, unknown))
        raise InvalidArgument(
            f"{field} has fields this gateway does not know (field numbers {numbers}): a newer "
            "client's filter would be ignored here; leave them out or upgrade the gateway"
        )
    for name, values, bound, chars, normalise in (
        (
            "categories",
            item_filter.categories,
            MAX_FILTER_VALUES,
            MAX_CATEGORY_CHARS,
            category_path,
        ),
        ("brands", item_filter.brands, MAX_FILTER_VALUES, MAX_BRAND_CHARS, label),
    ):
        if len(values) > bound:
            raise InvalidArgument(
                f"{field}.{name} must have at most {bound} values, got {len(values)}"
            )
        for position, value in enumerate(values):
            _max_chars(f"{field}.{name}[{position}]", value, chars)
            if not normalise(value):
                raise InvalidArgument(
                    f"{field}.{name}[{position}] must be non-empty (not only spaces or '|')"
                )
    buckets = item_filter.price_buckets
    if len(buckets) > len(_FILTER_PRICE_BUCKETS):
        raise InvalidArgument(
            f"{field}.price_buckets must have at most {len(_FILTER_PRICE_BUCKETS)} values, "
            f"got {len(buckets)}"
        )
    for position, bucket in enumerate(buckets):
        if bucket not in _FILTER_PRICE_BUCKETS:
            raise InvalidArgument(
                f"{field}.price_buckets[{position}] must be PRICE_BUCKET_BUDGET, "
                f"PRICE_BUCKET_MID_RANGE or PRICE_BUCKET_PREMIUM, got {bucket}"
            )
    for name, ids in (
        ("allow_item_ids", item_filter.allow_item_ids),
        ("deny_item_ids", item_filter.deny_item_ids),
    ):
        if len(ids) > limits.max_filter_item_ids:
            raise InvalidArgument(
                f"{field}.{name} must have at most {limits.max_filter_item_ids} ids, got {len(ids)}"
            )
        for position, item_id in enumerate(ids):
            _item_id(f"{field}.{name}[{position}]", item_id)


def _long_tail_weight(
    request: recommender_pb2.RecommendRequest | recommender_pb2.SimilarItemsRequest,
    limits: RequestLimits,
) -> None:
    if request.HasField("long_tail_weight"):
        weight = request.long_tail_weight
        bound = limits.long_tail_weight_max
        if not (math.isfinite(weight) and 0 <= weight <= bound):
            raise InvalidArgument(f"long_tail_weight must be in [0, {bound:g}], got {weight:g}")


def _context(field: str, context: recommender_pb2.Context) -> None:
    _timestamp(f"{field}.timestamp", context.timestamp)
    _max_chars(f"{field}.device", context.device, MAX_CONTEXT_LABEL_CHARS)
    _max_chars(f"{field}.region", context.region, MAX_CONTEXT_LABEL_CHARS)


def _request_id(field: str, value: str) -> None:
    if not (value.isascii() and value.isprintable()):
        raise InvalidArgument(f"{field} must contain printable ASCII characters only")
    _max_chars(field, value, MAX_REQUEST_ID_CHARS)


def _max_chars(field: str, value: str, bound: int) -> None:
    if len(value) > bound:
        raise InvalidArgument(f"{field} must be at most {bound} characters, got {len(value)}")


def _item_id_ok(value: str) -> bool:
    """`_item_id`'s rule, without building the field's name (the fast path of long lists)."""
    return bool(value) and len(value) <= MAX_ITEM_ID_CHARS


def _item_id(field: str, value: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} must be non-empty")
    _max_chars(field, value, MAX_ITEM_ID_CHARS)


def _timestamp_ok(value: int) -> bool:
    return 0 <= value <= MAX_TIMESTAMP_SECONDS


def _timestamp(field: str, value: int) -> None:
    if not _timestamp_ok(value):
        raise InvalidArgument(f"{field} must be in [0, {MAX_TIMESTAMP_SECONDS}], got {value}")
