"""Training sequences and their context buckets, from the cleaned events table.

The bucket rules are `ltrec_core.context`'s, the ones the gateway buckets a request with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ltrec_core import contract
from ltrec_core.context import normalise_label, time_buckets, vocabulary_buckets


def build_vocabulary(values: pd.Series | None) -> list[str]:
    """Sorted distinct normalised labels; bucket = 1 + position, 0 = unknown."""
    if values is None:
        return []
    clean = values.dropna().astype(str).map(normalise_label)
    return sorted(v for v in clean.unique() if v)


def label_buckets(values: pd.Series | None, vocabulary: list[str], n: int) -> np.ndarray:
    if values is None or not vocabulary:
        return np.zeros(n, dtype=np.int64)
    lookup = vocabulary_buckets(vocabulary)
    clean = values.astype("string").map(normalise_label, na_action="ignore")
    return clean.map(lookup).fillna(contract.UNKNOWN_BUCKET).astype(np.int64).to_numpy()


def context_matrix(
    events: pd.DataFrame, device_vocab: list[str], region_vocab: list[str]
) -> np.ndarray:
    """[n_events, 4] context buckets in `contract.CONTEXT_FIELDS` order."""
    n = len(events)
    hour, weekday = time_buckets(events["timestamp"].to_numpy())
    device = label_buckets(events.get("device"), device_vocab, n)
    region = label_buckets(events.get("region"), region_vocab, n)
    return np.stack([hour, weekday, device, region], axis=1)


@dataclass
class Sequences:
    """Per-user event sequences in time order, as flat arrays with offsets."""

    users: np.ndarray  # user ids, one per sequence
    offsets: np.ndarray  # [n_users + 1]
    items: np.ndarray  # catalogue index per event
    event_types: np.ndarray  # 1 + EVENT_TYPES index per event
    context: np.ndarray  # [n_events, 4]

    def __len__(self) -> int:
        return len(self.users)

    def user_slice(self, u: int) -> slice:
        return slice(int(self.offsets[u]), int(self.offsets[u + 1]))


def build_sequences(
    events: pd.DataFrame, device_vocab: list[str], region_vocab: list[str]
) -> Sequences:
    """Events must be sorted by user then time (as `load_dataset` returns them)."""
    user_col = events["user_id"].to_numpy()
    starts: np.ndarray | list[int] = (
        np.flatnonzero(np.r_[True, user_col[1:] != user_col[:-1]]) if len(events) else []
    )
    offsets = np.r_[starts, len(events)].astype(np.int64)
    return Sequences(
        users=user_col[starts] if len(events) else np.array([], dtype=object),
        offsets=offsets,
        items=events["item_index"].to_numpy(np.int64),
        event_types=events["event_index"].to_numpy(np.int64),
        context=context_matrix(events, device_vocab, region_vocab),
    )
