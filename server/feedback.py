"""The feedback store: an append-only, fsync'd log of served lists and user feedback.

Records are JSON lines in segment files ``feedback-<replica>-<sequence>.jsonl`` under one
directory. Each gateway replica writes its own segments (the replica name is part of the file
name), so replicas can share a volume without locking. A segment is never reopened: a restarted
gateway starts the next sequence number, and a full segment (``max_segment_bytes``) is closed and
the next one begun (rotation).

Durability: `FeedbackStore.append` returns only after its records were written and
``fdatasync``'d (and, for a new segment, after the directory entry was synced), so an
acknowledged record survives SIGKILL and power loss. Concurrent appends are group-committed: one
writer task takes everything pending, writes it in one call and syncs once. A crash can leave at
most one torn line at the end of a segment; that line was never acknowledged, and `read_records`
skips it (and counts it). Served lists are logged with `offer`, which does not wait for the disk.

The format is read by `read_records` here and turned into training events by `ltrec.feedback`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import metrics
from server.errors import BackendUnavailable, Overloaded, StartupError

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "feedback-"
SEGMENT_SUFFIX = ".jsonl"
_SEGMENT_RE = re.compile(r"^feedback-(?P<replica>[A-Za-z0-9_.-]+)-(?P<sequence>\d{6,})\.jsonl$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")

# Record kinds.
FEEDBACK = "feedback"
SERVED = "served"


def replica_name(configured: str = "") -> str:
    """A file-name-safe name for this gateway replica (default: the host name, i.e. the pod)."""
    name = _UNSAFE.sub("_", configured or socket.gethostname()).strip("_.-")
    return name[:64] or "gateway"


@dataclass
class _Pending:
    data: bytes
    records: int
    done: asyncio.Future[None] | None  # None: a served list nobody waits for


class FeedbackStore:
    """Append-only durable log; one writer task per store."""

    def __init__(
        self,
        directory: Path,
        *,
        replica: str = "",
        max_segment_bytes: int = 64 * 1024 * 1024,
        max_pending_records: int = 10_000,
    ) -> None:
        self.directory = Path(directory)
        self.replica = replica_name(replica)
        self.max_segment_bytes = max_segment_bytes
        self.max_pending_records = max_pending_records
        self._pending: list[_Pending] = []
        self._pending_records = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._fd: int | None = None
        self._segment: Path | None = None
        self._size = 0
        self._sequence = 0

    # --- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        """Creates the directory and finds the next sequence number; call before `start`."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            existing = [
                int(match["sequence"])
                for path in self.directory.iterdir()
                if (match := _SEGMENT_RE.match(path.name)) and match["replica"] == self.replica
            ]
        except OSError as exc:
            raise StartupError(
                f"LTREC_FEEDBACK_DIR: cannot use {self.directory}: {exc.strerror}"
            ) from exc
        self._sequence = max(existing, default=0)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._writer(), name="feedback-writer")

    async def close(self) -> None:
        """Writes and syncs everything pending, then closes the segment."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        await asyncio.to_thread(self._close_segment)

    # --- appending -----------------------------------------------------------------------------
    async def append(self, records: list[dict[str, Any]]) -> None:
        """Returns once every record is on disk; BackendUnavailable if it could not be written."""
        if self._closing or self._task is None:
            raise BackendUnavailable(
                "the feedback store is shutting down; retry on another replica"
            )
        if self._pending_records + len(records) > self.max_pending_records:
            raise Overloaded(
                f"the feedback store has {self._pending_records} records waiting for the disk "
                f"(limit {self.max_pending_records}); retry later"
            )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(_encode(records), len(records), done))
        await asyncio.shield(done)

    def offer(self, record: dict[str, Any]) -> bool:
        """Queues a record without waiting for the disk; False (and counted) when it is dropped."""
        if self._closing or self._task is None or self._pending_records >= self.max_pending_records:
            metrics.FEEDBACK_DROPPED_TOTAL.inc()
            return False
        self._enqueue(_Pending(_encode([record]), 1, None))
        return True

    def _enqueue(self, pending: _Pending) -> None:
        self._pending.append(pending)
        self._pending_records += pending.records
        self._wakeup.set()

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._pending = self._pending, []
            if batch:
                self._pending_records -= sum(p.records for p in batch)
                await self._commit(batch)
            if self._closing and not self._pending:
                return

    async def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        # Served lists nobody waits for are written without a sync (the next acknowledged
        # batch's sync covers them), so Recommend traffic alone costs no fsync per request.
        sync = any(p.done is not None for p in batch)
        try:
            await asyncio.to_thread(self._write, b"".join(p.data for p in batch), sync)
        except OSError as exc:
            metrics.FEEDBACK_WRITE_ERRORS_TOTAL.inc()
            logger.error("feedback store: write to %s failed: %s", self._segment, exc)
            error = BackendUnavailable(f"the feedback store cannot write ({exc.strerror}); retry")
            for pending in batch:
                if pending.done is None:
                    metrics.FEEDBACK_DROPPED_TOTAL.inc()
                elif not pending.done.done():
                    pending.done.set_exception(error)
            return
        if sync:
            metrics.FEEDBACK_COMMIT_DURATION_SECONDS.observe(time.perf_counter() - started)
        for pending in batch:
            if pending.done is not None and not pending.done.done():
                pending.done.set_result(None)

    # --- file work (runs in a worker thread, one call at a time) -------------------------------
    def _write(self, data: bytes, sync: bool) -> None:
        if self._fd is None:
            self._open_segment()
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
            # Drop the partial write so the segment stays line-aligned; if even that fails,
            # start a new segment next time (the reader tolerates one torn tail line).
            try:
                os.ftruncate(self._fd, good_size)
                os.lseek(self._fd, good_size, os.SEEK_SET)
            except OSError:
                self._close_segment()
            raise
        self._size = good_size + len(data)
        if self._size >= self.max_segment_bytes:
            self._close_segment()

    def _open_segment(self) -> None:
        self._sequence += 1
        path = (
            self.directory / f"{SEGMENT_PREFIX}{self.replica}-{self._sequence:06d}{SEGMENT_SUFFIX}"
        )
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        self._segment = path
        self._size = 0
        # The new directory entry must be durable too, or a synced segment could vanish.
        directory_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
        metrics.FEEDBACK_SEGMENTS_TOTAL.inc()
        logger.info("feedback store: writing %s", path)

    def _close_segment(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


def _encode(records: list[dict[str, Any]]) -> bytes:
    return b"".join(
        json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        for record in records
    )


# --- reading ----------------------------------------------------------------------------------
@dataclass
class ReadStats:
    segments: int = 0
    records: int = 0
    # Lines that are not a complete record: a crash mid-write leaves such a line (or a run of
    # NUL bytes) at the end of a segment. They were never acknowledged.
    unreadable_lines: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


def segments(directory: Path) -> list[Path]:
    """Segment files in write order per replica (replica name, then sequence)."""
    found = [
        (match["replica"], int(match["sequence"]), path)
        for path in Path(directory).iterdir()
        if (match := _SEGMENT_RE.match(path.name))
    ]
    return [path for _, _, path in sorted(found)]


def read_records(directory: Path, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every complete record of every segment, in write order per replica.

    A line without its newline, or one that is not a JSON record, is skipped and counted in
    `stats.unreadable_lines` (see `ReadStats`); an acknowledged record is always complete.
    """
    stats = stats if stats is not None else ReadStats()
    for path in segments(directory):
        stats.segments += 1
        lines = path.read_bytes().split(b"\n")
        # A complete segment ends with a newline, so the last element is empty.
        if lines.pop().strip(b"\0"):
            stats.unreadable_lines += 1
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not isinstance(record, dict) or record.get("kind") not in (FEEDBACK, SERVED):
                stats.unreadable_lines += 1
                logger.warning("%s: line %d is not a complete record; skipped", path, number)
                continue
            stats.records += 1
            stats.by_kind[record["kind"]] = stats.by_kind.get(record["kind"], 0) + 1
            yield record
