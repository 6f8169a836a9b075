"""The feedback store: an append-only, fsync'd log of served lists and user feedback.

Records (`ltrec_core.records.FeedbackRecord`, `ServedRecord`) are JSON lines in segment files
``feedback-<replica>-<sequence>.jsonl`` under one directory, written by the segment log shared
with the item store (`ltrec_core.segment_log`: one writer per replica, rotation, a failed write
never kept).

Durability: `FeedbackStore.append` returns only after its records were written and
``fdatasync``'d (and, for a new segment, after the directory entry was synced), so an
acknowledged record survives SIGKILL and power loss. Concurrent appends are group-committed: one
writer task takes everything pending, writes it in one call and syncs once. A crash can leave at
most one torn line at the end of a segment; that line was never acknowledged, and
`ltrec_core.feedback_log.read_records` skips it (and counts it). Served lists are logged with
`offer`, which does not wait for the disk.

The format is read by `ltrec_core.feedback_log` and turned into training events by
`ltrec.retrain`. ForgetUser's erasure records (`ltrec_core.erasure`) are appended like feedback;
the directory's erasure key (`erasure_key`) is made by the first of them.

Retention (`ltrec_core.feedback_log.retire`): every `SURVEY_INTERVAL_SECONDS` the store measures
the directory (metrics) and, when `retention_seconds` is set, deletes the closed segments that a
retraining consumed (`ltrec.retrain merge` records what it read) and that are older than that.
`python -m server.stores retire` runs one pass on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ltrec_core import feedback_log
from ltrec_core.erasure import ErasureError, load_or_create_key
from ltrec_core.feedback_log import SEGMENT_PREFIX, Retirement
from ltrec_core.segment_log import SegmentWriter, encode_lines, replica_name
from server import metrics
from server.errors import BackendUnavailable, Overloaded, StartupError

logger = logging.getLogger(__name__)

SURVEY_INTERVAL_SECONDS = 60.0
# Served lists (nobody waits for them) gather this long before they are written, unless a record
# someone waits for arrives first: one write, and one hop to a worker thread, per request would
# cost Recommend more than the write itself.
SERVED_LINGER_SECONDS = 0.05


class Offered(Protocol):
    """A record `offer` takes as it is (a `ServedRecord`): encoded later, off the request."""

    def to_json(self) -> dict[str, Any]: ...


@dataclass
class _Pending:
    # The bytes of appended records, or an offered record, encoded with its batch in the writer
    # thread (`encoded`).
    payload: bytes | dict[str, Any] | Offered
    records: int
    done: asyncio.Future[None] | None  # None: a served list nobody waits for

    def encoded(self) -> bytes:
        """The entry's JSON lines; an offered record that cannot be encoded is dropped (counted
        and logged), never the batch it is in nor the writer."""
        if isinstance(self.payload, bytes):
            return self.payload
        try:
            record = self.payload if isinstance(self.payload, dict) else self.payload.to_json()
            return encode_lines([record])
        except (TypeError, ValueError) as exc:
            metrics.FEEDBACK_DROPPED_TOTAL.inc()
            logger.error("feedback store: an offered record could not be encoded: %s", exc)
            return b""


class FeedbackStore:
    """Append-only durable log; one writer task per store."""

    def __init__(
        self,
        directory: Path,
        *,
        replica: str = "",
        max_segment_bytes: int = 64 * 1024 * 1024,
        max_pending_records: int = 10_000,
        retention_seconds: float = 0.0,
    ) -> None:
        self.directory = Path(directory)
        self.replica = replica_name(replica)
        self.max_segment_bytes = max_segment_bytes
        self.max_pending_records = max_pending_records
        # Consumed segments older than this are retired (0: never).
        self.retention_seconds = retention_seconds
        self._survey_task: asyncio.Task[None] | None = None
        self._pending: list[_Pending] = []
        self._pending_records = 0
        self._wakeup = asyncio.Event()
        self._urgent = asyncio.Event()  # a record someone waits for is pending, or closing
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._segment: Path | None = None
        self._erasure_key: bytes | None = None
        self._log = SegmentWriter(
            self.directory,
            SEGMENT_PREFIX,
            self.replica,
            max_segment_bytes,
            on_new_segment=self._new_segment,
        )

    # --- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        """Creates the directory and finds the next sequence number; call before `start`."""
        try:
            self._log.open()
        except OSError as exc:
            raise StartupError(
                f"LTREC_FEEDBACK_DIR: cannot use {self.directory}: {exc.strerror}"
            ) from exc

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._writer(), name="feedback-writer")
        if self._survey_task is None:
            self._survey_task = asyncio.create_task(self._surveys(), name="feedback-survey")

    async def close(self) -> None:
        """Writes and syncs everything pending, then closes the segment."""
        self._closing = True
        self._urgent.set()
        self._wakeup.set()
        if self._survey_task is not None:
            self._survey_task.cancel()
            await asyncio.gather(self._survey_task, return_exceptions=True)
            self._survey_task = None
        if self._task is not None:
            await self._task
            self._task = None
        await asyncio.to_thread(self._log.close)

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
        self._enqueue(_Pending(encode_lines(records), len(records), done))
        await asyncio.shield(done)

    def offer(self, record: dict[str, Any] | Offered) -> bool:
        """Queues a record without waiting for the disk; False (and counted) when it is dropped.
        The record is turned into its JSON line in the writer's thread, with its batch, not on
        the caller's request path; a record object must not change after it is offered."""
        if self._closing or self._task is None or self._pending_records >= self.max_pending_records:
            metrics.FEEDBACK_DROPPED_TOTAL.inc()
            return False
        self._enqueue(_Pending(record, 1, None))
        return True

    async def erasure_key(self) -> bytes:
        """The directory's erasure key, made on first use (`ltrec_core.erasure`);
        BackendUnavailable when it can be neither read nor made."""
        if self._erasure_key is None:
            try:
                self._erasure_key = await asyncio.to_thread(
                    load_or_create_key, self.directory, self.replica
                )
            except (OSError, ErasureError) as exc:
                metrics.FEEDBACK_WRITE_ERRORS_TOTAL.inc()
                logger.error("feedback store: no erasure key in %s: %s", self.directory, exc)
                raise BackendUnavailable(
                    "the feedback store cannot record an erasure (its erasure key is unusable)"
                ) from exc
        return self._erasure_key

    # --- size and retention ----------------------------------------------------------------
    async def survey(self) -> Retirement | None:
        """Measures the directory and, with a retention time, retires what it allows; None when
        retention is off or the pass failed (counted and logged; nothing is lost)."""
        retired = None
        if self.retention_seconds > 0:
            try:
                retired = await asyncio.to_thread(
                    feedback_log.retire, self.directory, self.retention_seconds
                )
            except (OSError, ValueError) as exc:
                metrics.FEEDBACK_RETENTION_ERRORS_TOTAL.inc()
                logger.error("feedback store: retention pass failed: %s", exc)
            else:
                if retired.segments:
                    metrics.FEEDBACK_SEGMENTS_RETIRED_TOTAL.inc(retired.segments)
                    logger.info(
                        "feedback store: retired %d consumed segments (%d bytes; %d erasure "
                        "records carried)",
                        retired.segments,
                        retired.bytes,
                        retired.erasures_carried,
                    )
        try:
            paths = await asyncio.to_thread(feedback_log.segments, self.directory)
            size = sum(await asyncio.to_thread(_sizes, paths))
        except OSError as exc:
            logger.warning("feedback store: cannot measure %s: %s", self.directory, exc)
        else:
            metrics.FEEDBACK_STORE_BYTES.set(size)
            metrics.FEEDBACK_STORE_SEGMENTS.set(len(paths))
        return retired

    async def _surveys(self) -> None:
        while True:
            await self.survey()
            await asyncio.sleep(SURVEY_INTERVAL_SECONDS)

    def _enqueue(self, pending: _Pending) -> None:
        self._pending.append(pending)
        self._pending_records += pending.records
        if pending.done is not None:
            self._urgent.set()
        self._wakeup.set()

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SERVED_LINGER_SECONDS):
                        await self._urgent.wait()
            self._wakeup.clear()
            self._urgent.clear()
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
            await asyncio.to_thread(self._write, batch, sync)
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

    def _write(self, batch: list[_Pending], sync: bool) -> None:
        """In a worker thread: the batch's lines (offered records encoded here) in one write."""
        self._log.write(b"".join(p.encoded() for p in batch), sync=sync)

    def _new_segment(self, path: Path) -> None:
        self._segment = path
        metrics.FEEDBACK_SEGMENTS_TOTAL.inc()
        logger.info("feedback store: writing %s", path)


def _sizes(paths: list[Path]) -> list[int]:
    sizes = []
    for path in paths:
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:
            continue
    return sizes
