"""The segment log both gateway stores keep: JSON lines in segment files, one writer per replica.

A log is a directory of files ``<prefix><replica>-<sequence>.jsonl`` (the feedback store's
prefix is ``feedback-``, the item store's ``items-``). Each gateway replica writes its own segments
(the replica name is part of the file name), so replicas can share a volume without locking. A
segment is never reopened: a restarted writer starts the next sequence number, and a full segment
(``max_segment_bytes``) is closed and the next one begun (rotation).

Durability: `SegmentWriter.write` returns only after its bytes were written and, unless told not
to, ``fdatasync``'d; a new segment's directory entry is synced before anything is written to it.
A failed write is never kept and never written over: what it left is cut off again (truncated to
the last good size) and the segment is closed, so the next write begins a new one. Readers may
already hold the bytes of a later good write, and a retried write must not land on top of them;
the records of a failed write were never acknowledged. A crash can still leave at most one torn
line at the end of a segment (never acknowledged); readers skip it (`SegmentReader`).

Sealing: a writer that closes a segment (rotation, shutdown) makes it read-only (mode 0440), and
a replica's segment is never written once a later one of the same replica exists. Either way it
is *closed* (`closed_segments`): what compaction (`ltrec_core.item_log`) and retention
(`ltrec_core.feedback_log`) may fold away or delete. A segment left by a killed writer stays
open until that replica writes its next one.

Pure Python (no numpy): the gateway's stores and `ltrec.retrain` (which reads the feedback log
offline) both use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def replica_name(configured: str = "") -> str:
    """A file-name-safe name for this gateway replica (default: the host name, i.e. the pod)."""
    name = _UNSAFE.sub("_", configured or socket.gethostname()).strip("_.-")
    return name[:64] or "gateway"


def segment_pattern(prefix: str) -> re.Pattern[str]:
    """Matches a segment's file name; groups `replica` and `sequence`."""
    return re.compile(
        rf"^{re.escape(prefix)}(?P<replica>[A-Za-z0-9_.-]+)-(?P<sequence>\d{{6,}})\.jsonl$"
    )


def segments(directory: Path, prefix: str) -> list[Path]:
    """Segment files in write order per replica (replica name, then sequence)."""
    pattern = segment_pattern(prefix)
    found = [
        (match["replica"], int(match["sequence"]), path)
        for path in Path(directory).iterdir()
        if (match := pattern.match(path.name))
    ]
    return [path for _, _, path in sorted(found)]


def parse_name(path: Path, prefix: str) -> tuple[str, int] | None:
    """(replica, sequence) of a segment's file name; None for any other file."""
    match = segment_pattern(prefix).match(path.name)
    return None if match is None else (match["replica"], int(match["sequence"]))


def closed_segments(directory: Path, prefix: str) -> list[Path]:
    """The segments no writer will append to again: every one of a replica but its last, and
    its last when sealed (see the module docstring)."""
    closed: list[Path] = []
    by_replica: dict[str, list[Path]] = {}
    for path in segments(directory, prefix):
        parsed = parse_name(path, prefix)
        assert parsed is not None
        by_replica.setdefault(parsed[0], []).append(path)
    for paths in by_replica.values():
        closed.extend(paths[:-1])
        try:
            if not paths[-1].stat().st_mode & stat.S_IWUSR:
                closed.append(paths[-1])
        except FileNotFoundError:
            continue
    return closed


def fsync_directory(directory: Path) -> None:
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def publish(
    directory: Path,
    name: str,
    data: bytes,
    *,
    replace: bool = False,
    mode: int = 0o440,
    writer: str = "",
) -> bool:
    """Writes `data` to a temporary file, fsyncs it, hard-links it in as `name` and fsyncs the
    directory: readers see the whole file or none. False (nothing changed) when `name` exists:
    of writers racing for one name, one wins. With `replace`, renamed over `name` instead.
    `writer` (a replica name) keeps the temporary files of writers on other hosts, whose
    process ids may be equal, apart in a shared directory."""
    directory = Path(directory)
    temporary = directory / f".{name}.{writer}{'.' if writer else ''}{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(temporary, directory / name)
        else:
            os.link(temporary, directory / name)
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(directory)
    return True


def encode_lines(records: list[dict[str, Any]]) -> bytes:
    """JSON lines, UTF-8, compact; each ends with a newline."""
    return b"".join(
        json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        for record in records
    )


class SegmentWriter:
    """Appends to this replica's segments of one log. Not thread-safe: callers serialise writes
    (both stores run them in a worker thread, one at a time)."""

    def __init__(
        self,
        directory: Path,
        prefix: str,
        replica: str,
        max_segment_bytes: int,
        on_new_segment: Callable[[Path], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.replica = replica
        self.max_segment_bytes = max_segment_bytes
        self._on_new_segment = on_new_segment
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self.sequence = 0

    @property
    def path(self) -> Path | None:
        """The open segment, if any."""
        return self._path

    def open(self) -> None:
        """Creates the directory and finds this replica's last sequence number (OSError if the
        directory is unusable); the first write begins the next one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        pattern = segment_pattern(self.prefix)
        own = [
            int(match["sequence"])
            for path in self.directory.iterdir()
            if (match := pattern.match(path.name)) and match["replica"] == self.replica
        ]
        self.sequence = max(own, default=0)

    def begin(self) -> int:
        """Opens a new segment unless one is open; returns the open segment's sequence number."""
        if self._fd is None:
            self._open_segment()
        return self.sequence

    def write(self, data: bytes, *, sync: bool = True) -> None:
        """Writes `data` (whole lines) and, with `sync`, fdatasyncs; OSError if it failed, and
        then nothing of `data` is kept (see the module docstring)."""
        self.begin()
        assert self._fd is not None
        good_size = self._size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if sync:
                os.fdatasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):  # the reader tolerates one torn tail line
                os.ftruncate(self._fd, good_size)
            self._abandon_segment()
            raise
        self._size = good_size + len(data)
        if self._size >= self.max_segment_bytes:
            self.close()

    def close(self) -> None:
        """Syncs, seals (read-only) and closes the open segment, if any."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
                os.fchmod(self._fd, 0o440)
            finally:
                self._abandon_segment()

    def _abandon_segment(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None
                self._path = None

    def _open_segment(self) -> None:
        self.sequence += 1
        path = self.directory / f"{self.prefix}{self.replica}-{self.sequence:06d}{SEGMENT_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        self._path = path
        self._size = 0
        # The new directory entry must be durable too, or a synced segment could vanish.
        fsync_directory(self.directory)
        if self._on_new_segment is not None:
            self._on_new_segment(path)


@dataclass
class Line:
    """One complete line of a segment (`number` counts from 1 within the segment)."""

    segment: Path
    number: int
    data: bytes


class SegmentReader:
    """Reads every replica's segments of one log, each from where the last `read` stopped.

    `read(final=False)` is for a log still being written (the item store polls it): a last line
    without its newline may still be in progress and waits for the next read. `read(final=True)`
    is for a log read once, after the fact (retraining reads the feedback log): such a line is a
    torn tail and is counted in `torn_tails` unless it is only NUL bytes (a file whose size grew
    before its data came). A segment that shrank (never happens to an append-only file, except
    where a failed write was cut off again) is read again from its start.
    """

    def __init__(
        self, directory: Path, prefix: str, skip: Callable[[Path], bool] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        # Segments not to read (compacted into a snapshot, `ltrec_core.item_log`).
        self.skip = skip
        self._offsets: dict[str, int] = {}
        self._lines: dict[str, int] = {}
        self.segments_read = 0
        self.torn_tails = 0

    @property
    def offsets(self) -> dict[str, int]:
        """Bytes read so far (complete lines; with `final`, all), by segment file name."""
        return dict(self._offsets)

    @property
    def lines(self) -> dict[str, int]:
        """Complete lines read so far, by segment file name."""
        return dict(self._lines)

    def read(self, *, final: bool = False) -> Iterator[Line]:
        for path in segments(self.directory, self.prefix):
            name = path.name
            if self.skip is not None and self.skip(path):
                self._offsets.pop(name, None)
                self._lines.pop(name, None)
                continue
            try:
                size = path.stat().st_size
                offset = self._offsets.get(name, 0)
                if size < offset:
                    offset = 0
                    self._lines[name] = 0
                if name not in self._offsets:
                    self.segments_read += 1
                if size == offset and not final:
                    self._offsets.setdefault(name, offset)
                    continue
                with path.open("rb") as handle:
                    handle.seek(offset)
                    data = handle.read(size - offset)
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            if final:
                if data[end:].strip(b"\0"):
                    self.torn_tails += 1
                self._offsets[name] = offset + len(data)
            else:
                self._offsets[name] = offset + end  # an unfinished last line waits
            number = self._lines.get(name, 0)
            for line in data[:end].split(b"\n")[:-1]:
                number += 1
                yield Line(path, number, line)
            self._lines[name] = number
