"""Context buckets (hour, weekday, device, region), defined once for training and the gateway.

Training buckets every event of the dataset (`ltrec.sequences`), the gateway one request's
context (`server.features`); both go through the functions here, so a request is bucketed exactly
as the events the model was trained on. Bucket 0 is unknown everywhere (`contract.UNKNOWN_BUCKET`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

from ltrec_core import contract


def normalise_label(label: str) -> str:
    """A device or region label as vocabularies hold it: stripped, lower-cased."""
    return label.strip().lower()


def vocabulary_buckets(vocabulary: Iterable[str]) -> dict[str, int]:
    """Label -> bucket (1 + position in the vocabulary; 0 is unknown). The first occurrence wins
    should a vocabulary ever repeat a label."""
    buckets: dict[str, int] = {}
    for position, label in enumerate(vocabulary):
        buckets.setdefault(label, position + 1)
    return buckets


def label_bucket(label: str, buckets: Mapping[str, int]) -> int:
    """One label's bucket; unknown and empty labels are `contract.UNKNOWN_BUCKET`."""
    return buckets.get(normalise_label(label), contract.UNKNOWN_BUCKET)


def time_buckets(
    timestamps: npt.ArrayLike,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(1 + UTC hour, 1 + UTC weekday with Monday = 0) for epoch seconds."""
    ts = np.asarray(timestamps, dtype=np.int64)
    hour = (ts // 3600) % 24 + 1
    weekday = ((ts // 86400) + 3) % 7 + 1  # 1970-01-01 was a Thursday (weekday 3)
    return hour.astype(np.int64), weekday.astype(np.int64)


def time_bucket(seconds: float) -> tuple[int, int]:
    """`time_buckets` of one moment; fractions of a second are floored, as a clock reads them."""
    # The same arithmetic in Python integers (floor division floors as numpy's does): no arrays
    # for one moment, on the gateway's path.
    whole = math.floor(seconds)
    return whole // 3600 % 24 + 1, (whole // 86400 + 3) % 7 + 1
