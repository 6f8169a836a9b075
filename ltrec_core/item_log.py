"""The item log on disk: segments, the snapshot they are compacted into, and compaction.

Segments ``items-<replica>-<sequence>.jsonl`` (`ltrec_core.segment_log`) hold `ItemUpsertRecord`
and `ItemDeleteRecord` lines (`ltrec_core.records`). Every record carries its position
(time, replica, segment, line), and an item's state is the record with the greatest position
(last writer wins), so a state is the same whatever order the records are read in.

Compaction folds the closed segments into one snapshot: ``items.snapshot-<generation>.jsonl``,
a header line, then for each item id only its winning record, its line copied byte for byte
(deletes too: a delete must still beat an older upsert in a segment not yet compacted). The
header names what it covers: per replica, the segments up to a sequence number (``sequences``,
cumulative over generations). Closed segments of a replica are a prefix of its sequence, so
that is exact. A generation's state is the previous snapshot's plus those segments', so
snapshot + the segments it does not cover = every record ever written, for the state.

Written atomically and safe while other replicas poll:

1. the new snapshot (generation G+1) is written to a temporary file, fsync'd, hard-linked into
   place (`segment_log.publish`: of compactors racing for G+1, one wins; the others change
   nothing) and the directory fsync'd;
2. only then are the segments it covers, and older snapshots, deleted.

A reader (`ItemLogReader`, the item store's poll) loads a snapshot whose generation is newer
than the one it has, then skips the segments it covers. A reader caught between the steps
either has not seen G+1 yet (and reads the segments, which still exist, or finds one gone and
reads it from G+1 at its next poll) or loads G+1; records it sees twice (a segment it had read,
and the snapshot) are the same records at the same positions, which last-writer-wins applies
once. A compactor killed anywhere leaves either no G+1 (nothing changed but a temporary file) or
G+1 and some covered files, which readers skip and the next compaction deletes.

A writer restarted under the same replica name continues after the covered sequence
(`covered_sequence`), so a compacted segment's name never comes back.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ltrec_core import segment_log
from ltrec_core.records import RecordError, item_record_from_json

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "items-"
SNAPSHOT = "item_snapshot"
SNAPSHOT_VERSION = 1
_SNAPSHOT_NAME = re.compile(r"^items\.snapshot-(?P<generation>\d{6,})\.jsonl$")
_TEMPORARY = re.compile(r"^\.items\.snapshot-(?P<generation>\d{6,})\.jsonl\.\d+\.tmp$")


class ItemLogError(ValueError):
    """A snapshot that is not whole (it was published whole: the disk or a hand changed it)."""


def snapshot_name(generation: int) -> str:
    return f"items.snapshot-{generation:06d}.jsonl"


def snapshots(directory: Path) -> dict[int, Path]:
    """The snapshot files, by generation."""
    found: dict[int, Path] = {}
    for path in Path(directory).iterdir():
        match = _SNAPSHOT_NAME.match(path.name)
        if match:
            found[int(match["generation"])] = path
    return found


@dataclass
class Snapshot:
    generation: int = 0
    sequences: dict[str, int] = field(default_factory=dict)
    lines: list[bytes] = field(default_factory=list)
    created_at: float = 0.0

    def covers(self, path: Path) -> bool:
        parsed = segment_log.parse_name(path, SEGMENT_PREFIX)
        return parsed is not None and parsed[1] <= self.sequences.get(parsed[0], 0)

    def encode(self) -> bytes:
        header = {
            "kind": SNAPSHOT,
            "schema_version": SNAPSHOT_VERSION,
            "generation": self.generation,
            "sequences": dict(sorted(self.sequences.items())),
            "records": len(self.lines),
            "created_at": self.created_at,
        }
        return segment_log.encode_lines([header]) + b"".join(line + b"\n" for line in self.lines)


def read_snapshot(path: Path) -> Snapshot:
    """FileNotFoundError when it was replaced meanwhile; ItemLogError when it is not whole."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    try:
        header = json.loads(lines[0])
        ok = (
            isinstance(header, dict)
            and header.get("kind") == SNAPSHOT
            and header.get("schema_version") == SNAPSHOT_VERSION
            and data.endswith(b"\n")
            and header.get("records") == len(lines) - 2
        )
        snapshot = Snapshot(
            generation=int(header["generation"]),
            sequences={str(k): int(v) for k, v in dict(header["sequences"]).items()},
            lines=lines[1:-1],
            created_at=float(header.get("created_at", 0.0)),
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ItemLogError(f"{path}: not a whole item snapshot")
    return snapshot


def latest_snapshot(directory: Path) -> Snapshot:
    """The newest snapshot (an empty generation 0 when there is none)."""
    while True:
        found = snapshots(directory)
        if not found:
            return Snapshot()
        try:
            return read_snapshot(found[max(found)])
        except FileNotFoundError:  # a newer generation replaced it: look again
            continue


def covered_sequence(directory: Path, replica: str) -> int:
    """The last sequence number of `replica` that a snapshot covers (0: none)."""
    found = snapshots(directory)
    while found:
        try:
            header = read_snapshot(found[max(found)])
        except FileNotFoundError:
            found = snapshots(directory)
            continue
        return header.sequences.get(replica, 0)
    return 0


class ItemLogReader:
    """Reads the item log as it grows: the newest snapshot once per generation, then the lines
    of the segments it does not cover, each from where the last `read` stopped (a last line
    without its newline waits). Yields each line's bytes."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.snapshot = Snapshot()
        self._segments = segment_log.SegmentReader(
            self.directory, SEGMENT_PREFIX, skip=lambda path: self.snapshot.covers(path)
        )
        self.snapshots_loaded = 0

    def read(self) -> Iterator[tuple[Path, bytes]]:
        found = snapshots(self.directory)
        while found and max(found) > self.snapshot.generation:
            try:
                snapshot = read_snapshot(found[max(found)])
            except FileNotFoundError:
                found = snapshots(self.directory)
                continue
            self.snapshot = snapshot
            self.snapshots_loaded += 1
            path = found[max(found)]
            for data in snapshot.lines:
                yield path, data
            break
        for line in self._segments.read():
            yield line.segment, line.data

    def tail(self, own_replica: str) -> tuple[int, int]:
        """(bytes, records) a compaction by `own_replica` would fold now: the closed segments
        not yet in a snapshot, and this replica's open one (it closes it first)."""
        offsets, lines = self._segments.offsets, self._segments.lines
        closed = set(segment_log.closed_segments(self.directory, SEGMENT_PREFIX))
        size = records = 0
        for path in segment_log.segments(self.directory, SEGMENT_PREFIX):
            parsed = segment_log.parse_name(path, SEGMENT_PREFIX)
            if parsed is None or self.snapshot.covers(path):
                continue
            if path in closed or parsed[0] == own_replica:
                size += offsets.get(path.name, 0)
                records += lines.get(path.name, 0)
        return size, records


def store_bytes(directory: Path) -> int:
    """Bytes of the log's files now (snapshots and segments)."""
    total = 0
    for path in Path(directory).iterdir():
        if _SNAPSHOT_NAME.match(path.name) or segment_log.parse_name(path, SEGMENT_PREFIX):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
    return total


@dataclass(frozen=True)
class Compaction:
    """What one compaction did."""

    generation: int
    segments: int  # segments folded into the new snapshot
    records_read: int  # records of the old snapshot and the segments
    records_kept: int  # in the new snapshot
    unreadable_lines: int
    bytes_before: int
    bytes_after: int


def compact(directory: Path, *, now: float | None = None) -> Compaction | None:
    """Folds the newest snapshot and the closed segments it does not cover into the next
    generation; None when there is nothing to fold, or another compactor published that
    generation first. OSError when the disk fails (nothing is deleted before the new snapshot
    is durable)."""
    directory = Path(directory)
    before = store_bytes(directory)
    base = latest_snapshot(directory)
    _delete_covered(directory, base)
    closed = [
        path
        for path in segment_log.closed_segments(directory, SEGMENT_PREFIX)
        if not base.covers(path)
    ]
    # Only a prefix of each replica's uncovered segments may be folded (see the docstring).
    closed_set = set(closed)
    sequences = dict(base.sequences)
    folded: list[Path] = []
    blocked: set[str] = set()
    for path in segment_log.segments(directory, SEGMENT_PREFIX):
        parsed = segment_log.parse_name(path, SEGMENT_PREFIX)
        assert parsed is not None
        replica, sequence = parsed
        if base.covers(path) or replica in blocked:
            continue
        if path not in closed_set:
            blocked.add(replica)
            continue
        folded.append(path)
        sequences[replica] = sequence
    if not folded:
        return None
    winners: dict[str, tuple[tuple[float, str, int, int], bytes]] = {}
    read = unreadable = 0
    for line in base.lines:
        read += _keep(winners, line)
    for path in folded:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # another compactor folded it: it publishes, not us
            return None
        for line in data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]:
            kept = _keep(winners, line)
            read += kept
            unreadable += 1 - kept if line.strip(b"\0") else 0
        if data[data.rfind(b"\n") + 1 :].strip(b"\0"):
            unreadable += 1  # a torn tail: never acknowledged
    snapshot = Snapshot(
        generation=base.generation + 1,
        sequences=sequences,
        lines=[line for _, line in sorted(winners.values(), key=lambda kept: kept[0])],
        created_at=time.time() if now is None else now,
    )
    if not segment_log.publish(directory, snapshot_name(snapshot.generation), snapshot.encode()):
        return None
    _delete_covered(directory, snapshot)
    return Compaction(
        generation=snapshot.generation,
        segments=len(folded),
        records_read=read,
        records_kept=len(snapshot.lines),
        unreadable_lines=unreadable,
        bytes_before=before,
        bytes_after=store_bytes(directory),
    )


def _keep(winners: dict[str, tuple[tuple[float, str, int, int], bytes]], line: bytes) -> int:
    """Keeps the line if it is its item's latest record; 1 if it was a record at all."""
    try:
        record = item_record_from_json(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError, RecordError):
        return 0
    assert record.position is not None
    key = record.position.key
    current = winners.get(record.item_id)
    if current is None or current[0] < key:
        winners[record.item_id] = (key, line)
    return 1


def _delete_covered(directory: Path, snapshot: Snapshot) -> None:
    """Deletes what `snapshot` makes redundant: the segments it covers, older snapshots, and
    temporary files of compactions that can no longer publish."""
    if snapshot.generation == 0:
        return
    deleted = False
    for path in Path(directory).iterdir():
        name = path.name
        match = _SNAPSHOT_NAME.match(name) or _TEMPORARY.match(name)
        if (
            match
            and int(match["generation"]) <= snapshot.generation
            and name != snapshot_name(snapshot.generation)
        ) or snapshot.covers(path):
            path.unlink(missing_ok=True)
            deleted = True
    if deleted:
        segment_log.fsync_directory(directory)
