"""Request -> ensemble input tensors: one row of a batch Triton's dynamic batcher may stack.

Requests of one shape batch together, so the variable lengths are padded to a few: the history
(left-padded, as the user encoder reads it) and a basket to a length of
`contract.HISTORY_BUCKETS` (then max_history), the exclusions to a power of two from
`contract.EXCLUDE_BUCKET_MIN`; padding is `PADDING_INDEX`, which the models ignore and never
return, so the answer is the unpadded one. k is per row ([1, 1]): the scorer returns the batch's
largest k, and `server.postprocess` keeps this request's first k.

Every request carries the catalogue snapshot's item overlay (items added after training,
indices N+1..N+M; [1, M, D]) and excludes its hidden items (deleted, or replaced by an added
item). Its business filter goes to the scorer as the eligibility mask (`server.item_filter`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np
import numpy.typing as npt

from ltrec_core import contract
from ltrec_core.context import label_bucket, time_bucket
from server.catalogue import Catalogue, ModelMetadata
from server.errors import NotFound
from server.gen.ltrec.v1 import recommender_pb2
from server.item_filter import NO_FILTER, eligibility

EVENT_TYPE_NAMES: dict[int, str] = {
    recommender_pb2.EVENT_TYPE_UNSPECIFIED: "view",
    recommender_pb2.EVENT_TYPE_VIEW: "view",
    recommender_pb2.EVENT_TYPE_CART: "cart",
    recommender_pb2.EVENT_TYPE_PURCHASE: "purchase",
    recommender_pb2.EVENT_TYPE_RATING: "rating",
}
# Proto enum value -> HISTORY_EVENT_TYPES index (1 + position in contract.EVENT_TYPES).
EVENT_TYPE_INDEX: dict[int, int] = {
    value: 1 + contract.EVENT_TYPES.index(name) for value, name in EVENT_TYPE_NAMES.items()
}
# A history event as the features read it: (timestamp, item_id, EventType value).
HistoryRow = tuple[int, str, int]
_TIMESTAMP = itemgetter(0)


def history_rows(events: Iterable[recommender_pb2.HistoryEvent]) -> list[HistoryRow]:
    """Each event's fields read once: reading a message's field is the costly part of a long
    history, so validation reads them and hands the rows on (`build_features`)."""
    return [(event.timestamp, event.item_id, event.event_type) for event in events]


@dataclass(frozen=True)
class Features:
    # [1, L]: L a history bucket, oldest first, left-padded; all padding without known history
    history_items: npt.NDArray[np.int64]
    history_event_types: npt.NDArray[np.int64]  # [1, L]
    context: npt.NDArray[np.int64]  # [1, 4]: hour, weekday, device, region buckets
    exclude_items: npt.NDArray[np.int64]  # [1, E]: E an exclusion bucket, right-padded
    long_tail_weight: npt.NDArray[np.float32]  # [1, 1]
    top_k: npt.NDArray[np.int64]  # [1, 1]
    skipped_history_items: int
    extra_item_vectors: npt.NDArray[np.float32]  # [1, M, D]
    extra_popularity: npt.NDArray[np.float32]  # [1, M]
    history_events: int = 0  # known history items the model reads (the unpadded length)
    # [1, N+M+1]: the items the request's filter lets pass; [[True]] without a filter
    item_eligible: npt.NDArray[np.bool_] = field(default_factory=lambda: NO_FILTER)

    def as_inputs(self) -> dict[str, np.ndarray]:
        return {
            contract.HISTORY_ITEMS: self.history_items,
            contract.HISTORY_EVENT_TYPES: self.history_event_types,
            contract.CONTEXT: self.context,
            contract.EXCLUDE_ITEMS: self.exclude_items,
            contract.LONG_TAIL_WEIGHT: self.long_tail_weight,
            contract.TOP_K: self.top_k,
            contract.EXTRA_ITEM_VECTORS: self.extra_item_vectors,
            contract.EXTRA_POPULARITY: self.extra_popularity,
            contract.ITEM_ELIGIBLE: self.item_eligible,
        }

    @property
    def has_history(self) -> bool:
        return self.history_events > 0


def build_features(
    request: recommender_pb2.RecommendRequest,
    metadata: ModelMetadata,
    catalogue: Catalogue,
    now_seconds: float,
    history: Sequence[HistoryRow] | None = None,
) -> Features:
    """Expects a validated request; unknown history ids are skipped and counted. A filter value
    the catalogue does not have is InvalidArgument.

    `history`: the rows to read instead of the request's history (the request's as validation
    read them, or the stored history of its user; `server.history`).
    """
    given = history_rows(request.history) if history is None else history
    # sorted() is stable: events given oldest first keep their order on ties and missing times.
    events = sorted(given, key=_TIMESTAMP)
    index_of = catalogue.index_of
    items: list[int] = []
    event_types: list[int] = []
    skipped = 0
    for _, item_id, event_type in events:
        index = index_of.get(item_id)
        if index is None:
            skipped += 1
            continue
        items.append(index)
        event_types.append(EVENT_TYPE_INDEX[event_type])
    items = items[-metadata.max_history :]
    event_types = event_types[-metadata.max_history :]
    used = len(items)
    width = contract.padded_length(used, contract.HISTORY_BUCKETS, metadata.max_history)

    return Features(
        history_items=padded_row(items, width, left=True),
        history_event_types=padded_row(event_types, width, left=True),
        context=np.asarray([context_buckets(request.context, metadata, now_seconds)], np.int64),
        exclude_items=exclusions(request.exclude_item_ids, catalogue),
        long_tail_weight=long_tail_weight(request, metadata.default_long_tail_weight),
        top_k=np.asarray([[min(request.k, catalogue.size)]], dtype=np.int64),
        skipped_history_items=skipped,
        extra_item_vectors=catalogue.extra_vectors[np.newaxis],
        extra_popularity=catalogue.extra_popularity[np.newaxis],
        history_events=used,
        item_eligible=eligibility(request.filter, catalogue),
    )


@dataclass(frozen=True)
class SimilarFeatures:
    """The `similar_items` ensemble's inputs: the query item, or the basket's items, instead of a
    history."""

    # [1, L]: the item, or the basket's items, in order, right-padded to a history bucket
    query_items: npt.NDArray[np.int64]
    exclude_items: npt.NDArray[np.int64]  # [1, E], as Features'
    long_tail_weight: npt.NDArray[np.float32]  # [1, 1]
    top_k: npt.NDArray[np.int64]  # [1, 1]
    extra_item_vectors: npt.NDArray[np.float32]  # [1, M, D]
    extra_popularity: npt.NDArray[np.float32]  # [1, M]
    item_eligible: npt.NDArray[np.bool_] = field(default_factory=lambda: NO_FILTER)  # as Features'

    def as_inputs(self) -> dict[str, np.ndarray]:
        return {
            contract.QUERY_ITEMS: self.query_items,
            contract.EXCLUDE_ITEMS: self.exclude_items,
            contract.LONG_TAIL_WEIGHT: self.long_tail_weight,
            contract.TOP_K: self.top_k,
            contract.EXTRA_ITEM_VECTORS: self.extra_item_vectors,
            contract.EXTRA_POPULARITY: self.extra_popularity,
            contract.ITEM_ELIGIBLE: self.item_eligible,
        }


def query_indices(request: recommender_pb2.SimilarItemsRequest, catalogue: Catalogue) -> list[int]:
    """The catalogue indices of a validated request's item_id, or of its basket in order;
    NotFound naming the first id the catalogue does not serve (unknown or hidden)."""
    named = (
        [(f"basket_item_ids[{p}]", i) for p, i in enumerate(request.basket_item_ids)]
        if request.basket_item_ids
        else [("item_id", request.item_id)]
    )
    indices = []
    for field_name, item_id in named:
        index = catalogue.index_of.get(item_id)
        if index is None or catalogue.is_hidden(index):
            raise NotFound(f"{field_name} {item_id!r} is not in the catalogue")
        indices.append(index)
    return indices


def build_similar_features(
    request: recommender_pb2.SimilarItemsRequest,
    metadata: ModelMetadata,
    catalogue: Catalogue,
    query: Sequence[int],
) -> SimilarFeatures:
    """Expects a validated request and its query items' (known, not hidden) indices
    (`query_indices`): one, or the basket's."""
    width = contract.padded_length(len(query), contract.HISTORY_BUCKETS, metadata.max_history)
    return SimilarFeatures(
        query_items=padded_row(query, width, left=False),
        exclude_items=exclusions(request.exclude_item_ids, catalogue),
        # SimilarItems' own default: its scores are item-item, on another scale than Recommend's
        long_tail_weight=long_tail_weight(request, metadata.similar_items_default_long_tail_weight),
        # the query items themselves are masked: at most N + M - L others
        top_k=np.asarray([[min(request.k, catalogue.size)]], dtype=np.int64),
        extra_item_vectors=catalogue.extra_vectors[np.newaxis],
        extra_popularity=catalogue.extra_popularity[np.newaxis],
        item_eligible=eligibility(request.filter, catalogue),
    )


def exclusions(item_ids: Iterable[str], catalogue: Catalogue) -> npt.NDArray[np.int64]:
    """[1, E]: the known requested exclusions, then the catalogue's hidden items, padded to
    `contract.exclude_length`."""
    requested = [catalogue.index_of.get(i) for i in item_ids]
    excluded = [i for i in dict.fromkeys(requested) if i is not None]
    out = np.zeros((1, contract.exclude_length(len(excluded) + catalogue.hidden.size)), np.int64)
    out[0, : len(excluded)] = excluded
    out[0, len(excluded) : len(excluded) + catalogue.hidden.size] = catalogue.hidden
    return out


def padded_row(values: Sequence[int], width: int, *, left: bool) -> npt.NDArray[np.int64]:
    """[1, width]: `values` then PADDING_INDEX (or PADDING_INDEX then `values`, `left`)."""
    out = np.full((1, max(width, len(values))), contract.PADDING_INDEX, dtype=np.int64)
    if values:
        if left:
            out[0, out.shape[1] - len(values) :] = values
        else:
            out[0, : len(values)] = values
    return out


def overlay_subset(
    indices: npt.NDArray[np.int64], catalogue: Catalogue
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """`indices` [R, L] with the overlay items they read renumbered N+1, N+2, ..., and those
    items' vectors once per row, [R, M', D]: what a batching model that only gathers the
    vectors of `indices` (user encoder, item lookup) needs, instead of the whole overlay R
    times. Its outputs are those of the whole overlay."""
    first = catalogue.trained_size + 1
    added = indices >= first
    used = np.unique(indices[added])
    remapped = indices.copy()
    remapped[added] = first + np.searchsorted(used, indices[added])
    vectors = catalogue.extra_vectors[used - first]
    return remapped, np.ascontiguousarray(np.broadcast_to(vectors, (len(indices), *vectors.shape)))


def long_tail_weight(
    request: recommender_pb2.RecommendRequest | recommender_pb2.SimilarItemsRequest,
    default: float,
) -> npt.NDArray[np.float32]:
    """The request's weight, else the method's `default` from the metadata."""
    weight = request.long_tail_weight if request.HasField("long_tail_weight") else default
    return np.asarray([[weight]], dtype=np.float32)


def context_buckets(
    context: recommender_pb2.Context, metadata: ModelMetadata, now_seconds: float
) -> list[int]:
    """(1 + UTC hour, 1 + UTC weekday with Monday = 0, device bucket, region bucket)."""
    hour, weekday = time_bucket(context.timestamp or now_seconds)
    return [
        hour,
        weekday,
        label_bucket(context.device, metadata.device_buckets),
        label_bucket(context.region, metadata.region_buckets),
    ]
