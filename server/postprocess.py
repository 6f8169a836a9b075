"""Ensemble outputs -> response items: ids, titles, long-tail flags and a short reason."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ltrec_core import contract
from server.catalogue import Catalogue
from server.errors import BackendError
from server.features import Features, SimilarFeatures
from server.gen.ltrec.v1 import recommender_pb2

# Keyed by contract.EVENT_TYPES names, so a reordered vocabulary cannot swap the verbs.
_VERBS = {"view": "viewed", "cart": "added to cart", "purchase": "bought", "rating": "rated"}
POPULAR_REASON = "Popular right now"
LONG_TAIL_REASON = "A long-tail pick"


def build_items(
    outputs: Mapping[str, np.ndarray], features: Features, catalogue: Catalogue
) -> list[recommender_pb2.RecommendedItem]:
    """Keeps the request's first k (a batch returns its largest k) and drops the -inf padding of
    short rankings; anything inconsistent is a backend error."""
    history = features.history_items[0].tolist()
    event_types = features.history_event_types[0].tolist()
    # The scorer already removes these (and the items the filter leaves out); checking again
    # keeps a masking bug from reaching users.
    never = set(history)
    never.update(features.exclude_items[0].tolist())
    has_history = features.has_history

    def reason(long_tail: bool, position: int) -> str:
        if (
            has_history
            and 0 <= position < len(history)
            and history[position] != contract.PADDING_INDEX
        ):
            verb = _VERBS[contract.EVENT_TYPES[event_types[position] - 1]]
            return f'Because you {verb} "{catalogue.titles[history[position]]}"'
        return LONG_TAIL_REASON if long_tail else POPULAR_REASON

    return _ranked_items(
        outputs, int(features.top_k[0, 0]), never, features.item_eligible, catalogue, reason
    )


def build_similar_items(
    outputs: Mapping[str, np.ndarray], features: SimilarFeatures, catalogue: Catalogue
) -> list[recommender_pb2.RecommendedItem]:
    """Like `build_items`; no query item is ever returned, and each reason names the query item
    the scorer found closest (cosine) to the returned one: the item, or one of the basket's."""
    query = features.query_items[0].tolist()
    never = set(query) | set(features.exclude_items[0].tolist())

    def reason(_long_tail: bool, position: int) -> str:
        closest = query[position] if 0 <= position < len(query) else query[0]
        return f'Similar to "{catalogue.titles[closest]}"'

    return _ranked_items(
        outputs, int(features.top_k[0, 0]), never, features.item_eligible, catalogue, reason
    )


def _ranked_items(
    outputs: Mapping[str, np.ndarray],
    top_k: int,
    never: set[int],
    eligible: np.ndarray,
    catalogue: Catalogue,
    reason: Callable[[bool, int], str],
) -> list[recommender_pb2.RecommendedItem]:
    items = _flat(outputs, contract.TOP_ITEMS)
    scores = _flat(outputs, contract.TOP_SCORES)
    positions = _flat(outputs, contract.REASON_POSITIONS)
    if not len(items) == len(scores) == len(positions):
        raise BackendError(
            f"ensemble returned {len(items)} items, {len(scores)} scores and "
            f"{len(positions)} reason positions"
        )
    # A batch returns its largest k; this request's top k are the first k of its row.
    items, scores, positions = items[:top_k], scores[:top_k], positions[:top_k]
    never = never | {contract.PADDING_INDEX}
    passes = eligible.reshape(-1)  # [N+M+1], or [1] for every item
    filtered = len(passes) > 1
    size = catalogue.size
    long_tails = catalogue.long_tail
    item_ids, titles = catalogue.item_ids, catalogue.titles

    response: list[recommender_pb2.RecommendedItem] = []
    for index, score, position in zip(
        items.tolist(), scores.tolist(), positions.tolist(), strict=True
    ):
        if not math.isfinite(score):
            continue
        if not 0 < index <= size:
            raise BackendError(
                f"ensemble returned catalogue index {index} outside [1, {size}]: "
                "is the model repository from the same export as the catalogue?"
            )
        if index in never or not passes[index if filtered else 0]:
            continue
        long_tail = bool(long_tails[index])
        response.append(
            recommender_pb2.RecommendedItem(
                item_id=item_ids[index],
                title=titles[index],
                score=score,
                long_tail=long_tail,
                reason=reason(long_tail, position),
            )
        )
    return response


def _flat(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    array = outputs.get(name)
    if array is None:
        raise BackendError(f"ensemble output {name} is missing")
    if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[0] != 1):
        raise BackendError(f"ensemble output {name} must have shape [1, k], got {array.shape}")
    return array.reshape(-1)
