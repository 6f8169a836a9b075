"""The feedback log on disk: where the gateway's feedback store writes, and how it is read back.

Segments ``feedback-<replica>-<sequence>.jsonl`` (`ltrec_core.segment_log`) of `FeedbackRecord`,
`ServedRecord` and `UserErasureRecord` lines (`ltrec_core.records`). The gateway writes them
(`server.stores.feedback`); retraining reads them with `read_records` (`ltrec.retrain`), and
honours the erasures (`ltrec_core.erasure`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ltrec_core import segment_log
from ltrec_core.records import ERASURE, FEEDBACK, SERVED, ReadStats

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "feedback-"
KINDS = (FEEDBACK, SERVED, ERASURE)

__all__ = ["SEGMENT_PREFIX", "ReadStats", "read_records", "segments"]


def segments(directory: Path) -> list[Path]:
    """Segment files in write order per replica (replica name, then sequence)."""
    return segment_log.segments(directory, SEGMENT_PREFIX)


def read_records(directory: Path, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every complete record of every segment, in write order per replica, as JSON objects
    (`FeedbackRecord.from_json` types a feedback one).

    A line without its newline, or one that is not a JSON record, is skipped and counted in
    `stats.unreadable_lines` (see `ReadStats`); an acknowledged record is always complete.
    """
    stats = stats if stats is not None else ReadStats()
    reader = segment_log.SegmentReader(directory, SEGMENT_PREFIX)
    counted = 0
    for line in reader.read(final=True):
        stats.segments += reader.segments_read - counted
        counted = reader.segments_read
        try:
            record = json.loads(line.data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or record.get("kind") not in KINDS:
            stats.unreadable_lines += 1
            logger.warning(
                "%s: line %d is not a complete record; skipped", line.segment, line.number
            )
            continue
        stats.records += 1
        stats.by_kind[record["kind"]] = stats.by_kind.get(record["kind"], 0) + 1
        yield record
    stats.segments += reader.segments_read - counted
    stats.unreadable_lines += reader.torn_tails
