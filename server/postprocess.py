"""Ensemble outputs -> response items: ids, titles, long-tail flags and a short reason."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from server import contract
from server.catalogue import Catalogue
from server.errors import BackendError
from server.features import Features
from server.gen.ltrec.v1 import recommender_pb2

# Keyed by contract.EVENT_TYPES names, so a reordered vocabulary cannot swap the verbs.
_VERBS = {"view": "viewed", "cart": "added to cart", "purchase": "bought", "rating": "rated"}
POPULAR_REASON = "Popular right now"
LONG_TAIL_REASON = "A long-tail pick"


def build_items(
    outputs: Mapping[str, np.ndarray], features: Features, catalogue: Catalogue
) -> list[recommender_pb2.RecommendedItem]:
    """Drops the -inf padding of short rankings; anything inconsistent is a backend error."""
    items = _flat(outputs, contract.TOP_ITEMS)
    scores = _flat(outputs, contract.TOP_SCORES)
    positions = _flat(outputs, contract.REASON_POSITIONS)
    if not len(items) == len(scores) == len(positions):
        raise BackendError(
            f"ensemble returned {len(items)} items, {len(scores)} scores and "
            f"{len(positions)} reason positions"
        )
    if len(items) > int(features.top_k[0]):
        raise BackendError(f"ensemble returned {len(items)} items for top_k {features.top_k[0]}")
    history = features.history_items[0]
    event_types = features.history_event_types[0]
    # The scorer already removes these; checking again keeps a filter bug from reaching users.
    never = set(history.tolist()) | set(features.exclude_items[0].tolist())
    never.add(contract.PADDING_INDEX)

    response: list[recommender_pb2.RecommendedItem] = []
    for index, score, position in zip(
        items.tolist(), scores.tolist(), positions.tolist(), strict=True
    ):
        if not np.isfinite(score):
            continue
        if not 0 < index <= catalogue.size:
            raise BackendError(
                f"ensemble returned catalogue index {index} outside [1, {catalogue.size}]: "
                "is the model repository from the same export as the catalogue?"
            )
        if index in never:
            continue
        long_tail = bool(catalogue.long_tail[index])
        if features.has_history and 0 <= position < len(history):
            verb = _VERBS[contract.EVENT_TYPES[int(event_types[position]) - 1]]
            reason = f'Because you {verb} "{catalogue.titles[int(history[position])]}"'
        else:
            reason = LONG_TAIL_REASON if long_tail else POPULAR_REASON
        response.append(
            recommender_pb2.RecommendedItem(
                item_id=catalogue.item_ids[index],
                title=catalogue.titles[index],
                score=score,
                long_tail=long_tail,
                reason=reason,
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
