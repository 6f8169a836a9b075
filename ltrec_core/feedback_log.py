"""The feedback log on disk: where the gateway's feedback store writes, how it is read back, and
which segments retention may retire.

Segments ``feedback-<replica>-<sequence>.jsonl`` (`ltrec_core.segment_log`) of `FeedbackRecord`,
`ServedRecord` and `UserErasureRecord` lines (`ltrec_core.records`). The gateway writes them
(`server.stores.feedback`); retraining reads them with `read_records` (`ltrec.retrain`), and
honours the erasures (`ltrec_core.erasure`).

Retention. `ltrec.retrain merge` records what it read (`record_consumed`: per segment, the bytes
read, in `CONSUMED_FILE`, replaced atomically). `retire` then deletes a segment only when

* it is closed and not its replica's last (a replica's last segment is kept, so a restarted
  writer never reuses a sequence number: `SegmentWriter.open` continues after the last one),
* a retraining consumed all of it (bytes consumed >= its size), and
* its last write is older than the retention time.

ForgetUser's tombstones must outlive the segments they were written in (they erase the user's
records wherever they are, later ones included), so before a segment with tombstones is deleted,
they are carried into ``feedback-_erasures-<sequence>.jsonl`` (with those carried before;
published atomically, the older one deleted after). `read_records` reads it like any segment; no
gateway replica can be named ``_erasures`` (`replica_name` strips a leading ``_``). A retraining
that reads the log while a retention pass deletes segments may miss their records (already
consumed) but never a tombstone: `read_records` lists the directory again until no new segment
appears, and the carried file is published before any segment is deleted. Retention passes are
serialised by a lock file (`fcntl.flock`); a pass killed anywhere leaves at most a duplicate of
tombstones (harmless) and segments still to retire.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltrec_core import segment_log
from ltrec_core.records import ERASURE, FEEDBACK, SERVED, ReadStats

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "feedback-"
KINDS = (FEEDBACK, SERVED, ERASURE)
CONSUMED_FILE = "retrain-consumed.json"
CONSUMED_VERSION = 1
CARRIED_REPLICA = "_erasures"
LOCK_FILE = ".retention.lock"

__all__ = [
    "SEGMENT_PREFIX",
    "ReadStats",
    "Retirement",
    "read_consumed",
    "read_records",
    "record_consumed",
    "retire",
    "segments",
]


def segments(directory: Path) -> list[Path]:
    """Segment files in write order per replica (replica name, then sequence)."""
    return segment_log.segments(directory, SEGMENT_PREFIX)


def read_records(
    directory: Path, stats: ReadStats | None = None, consumed: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """Every complete record of every segment, in write order per replica, as JSON objects
    (`FeedbackRecord.from_json` types a feedback one). `consumed`, when given, receives the
    bytes read per segment file name (for `record_consumed`).

    A line without its newline, or one that is not a JSON record, is skipped and counted in
    `stats.unreadable_lines` (see `ReadStats`); an acknowledged record is always complete.
    """
    stats = stats if stats is not None else ReadStats()
    seen: set[str] = set()
    while True:  # again while new segments appear (a retention pass's carried tombstones)
        reader = segment_log.SegmentReader(
            directory, SEGMENT_PREFIX, skip=lambda path: path.name in seen
        )
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
        offsets = reader.offsets
        if consumed is not None:
            consumed.update(offsets)
        if not offsets:
            return
        seen.update(offsets)


def read_consumed(directory: Path) -> dict[str, int]:
    """Bytes consumed by retraining, per segment file name ({} when none was recorded);
    ValueError when the file is not a consumption record."""
    path = Path(directory) / CONSUMED_FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("version") != CONSUMED_VERSION:
        raise ValueError(f"{path}: not a version {CONSUMED_VERSION} consumption record")
    try:
        return {str(name): int(entry["bytes"]) for name, entry in raw["segments"].items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: segments must map names to {{bytes: N}}") from None


def record_consumed(directory: Path, consumed: dict[str, int], now: float | None = None) -> None:
    """Adds what a retraining read to `CONSUMED_FILE` (atomically replaced; names of segments
    that no longer exist are dropped). A retraining racing another may lose the other's entry:
    its segments are then retired later, never sooner."""
    directory = Path(directory)
    now = time.time() if now is None else now
    try:
        before = read_consumed(directory)
    except ValueError:
        before = {}
    present = {path.name for path in segments(directory)}
    merged = {
        name: max(size, before.get(name, 0))
        for name, size in {**before, **consumed}.items()
        if name in present
    }
    document = {
        "version": CONSUMED_VERSION,
        "recorded_at": now,
        "segments": {name: {"bytes": size} for name, size in sorted(merged.items())},
    }
    data = (json.dumps(document, indent=1) + "\n").encode("utf-8")
    segment_log.publish(directory, CONSUMED_FILE, data, replace=True)


@dataclass(frozen=True)
class Retirement:
    """What one retention pass did."""

    segments: int
    bytes: int
    erasures_carried: int


def retire(directory: Path, retention_seconds: float, now: float | None = None) -> Retirement:
    """Deletes the segments retention allows (see the module docstring). OSError on a disk
    error, ValueError on an unreadable consumption record; nothing acknowledged is lost either
    way."""
    directory = Path(directory)
    now = time.time() if now is None else now
    lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        return _retire(directory, retention_seconds, now)
    finally:
        os.close(lock_fd)  # releases the lock


def _retire(directory: Path, retention_seconds: float, now: float) -> Retirement:
    consumed = read_consumed(directory)
    if not consumed:
        return Retirement(0, 0, 0)
    by_replica: dict[str, list[Path]] = {}
    for path in segments(directory):
        parsed = segment_log.parse_name(path, SEGMENT_PREFIX)
        assert parsed is not None
        by_replica.setdefault(parsed[0], []).append(path)
    carried = by_replica.pop(CARRIED_REPLICA, [])
    retiring: list[tuple[Path, int]] = []
    for paths in by_replica.values():
        for path in paths[:-1]:
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if consumed.get(path.name, -1) >= info.st_size and info.st_mtime <= now - (
                retention_seconds
            ):
                retiring.append((path, info.st_size))
    if not retiring:
        return Retirement(0, 0, 0)
    tombstones = [line for path, _ in retiring for line in _erasure_lines(path)]
    if tombstones:
        kept = [line for path in carried for line in _erasure_lines(path)]
        lines = list(dict.fromkeys(kept + tombstones))  # once each, in order
        sequence = (
            1
            + max((segment_log.parse_name(path, SEGMENT_PREFIX) or ("", 0))[1] for path in carried)
            if carried
            else 1
        )
        name = f"{SEGMENT_PREFIX}{CARRIED_REPLICA}-{sequence:06d}{segment_log.SEGMENT_SUFFIX}"
        if not segment_log.publish(directory, name, b"".join(line + b"\n" for line in lines)):
            raise OSError(f"{directory / name} exists: another retention pass is running")
    for path, _ in retiring:
        path.unlink(missing_ok=True)
    if tombstones:
        for path in carried:
            path.unlink(missing_ok=True)
    segment_log.fsync_directory(directory)
    return Retirement(len(retiring), sum(size for _, size in retiring), len(tombstones))


def _erasure_lines(path: Path) -> list[bytes]:
    """The complete erasure lines of a segment, as written."""
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
        lines = data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]
        needle = json.dumps(ERASURE).encode()
        return [line for line in lines if needle in line and _is_erasure(line)]
    return []


def _is_erasure(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and record.get("kind") == ERASURE
