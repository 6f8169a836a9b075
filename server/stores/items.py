"""The item store: items added or hidden after training, durable and shared by every replica.

`UpsertItems` encodes new items through the Triton item encoder and `DeleteItems` hides
items; both append records (JSON lines) to segment files ``items-<replica>-<sequence>.jsonl``
under one directory (`LTREC_ITEMS_DIR`, a volume every gateway replica mounts) and answer only
after ``fdatasync``. Each replica writes its own segments (no locking) and reads everyone's: it
applies its own records at once and polls the directory (every `LTREC_ITEMS_POLL_INTERVAL_SECONDS`,
by file size) for the others', so a restarted or added replica rebuilds the same items from the
files, and all replicas agree within one poll interval.

State per item id is a last-writer-wins register keyed by (wall-clock time, replica, segment,
line): the order in which a replica reads the segments does not matter, so replicas converge.
(Two writes to the same item on two replicas within their clock skew may resolve either way.)

The live items become the overlay of the trained catalogue (`Catalogue.with_overlay`): added
items are indices N+1..N+M, whose vectors and popularity go to Triton with every request;
deleted trained items, and trained items replaced by an upsert, are hidden (excluded from every
request). A record's vector belongs to the model version that encoded it: after a rollout, each
replica re-encodes the items (through Triton, in the background) before serving them, from
their text, attributes and image features: the image bytes are not kept, but the frozen image
encoder's output is (1,280 floats per item with a photo), so a rollout re-runs only the item
encoder's trained fusion.

The records are `ltrec_core.records.ItemUpsertRecord` and `ItemDeleteRecord`, written by the
segment log shared with the feedback store (`ltrec_core.segment_log`). A crash can leave one torn
line at the end of a segment (never acknowledged; a segment is never reopened); readers apply
complete lines only. Writes are rare (catalogue changes, not traffic), so one write and one sync
per call, serialised, is enough.

Compaction (`ltrec_core.item_log`): when the records not yet in a snapshot that this replica
could fold pass `compact_tail_bytes` or `compact_tail_records`, the poll closes this replica's
segment and folds the closed segments into the next snapshot generation (each item's winning
record), published atomically before anything is deleted; every replica's poll loads a newer
generation when it sees one. `python -m server.stores compact` does the same on demand.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ltrec_core import contract, item_log
from ltrec_core.item_log import Compaction, ItemLogError, ItemLogReader
from ltrec_core.item_text import ItemFields
from ltrec_core.records import (
    DELETE,
    UPSERT,
    ItemDeleteRecord,
    ItemRecord,
    ItemUpsertRecord,
    LogPosition,
    RecordError,
    item_record_from_json,
)
from ltrec_core.segment_log import SegmentWriter, encode_lines, replica_name
from server import metrics
from server.catalogue import Catalogue, ModelMetadata
from server.errors import BackendUnavailable, GatewayError, Overloaded, StartupError
from server.item_encoder import ItemRow
from server.item_filter import FacetRow

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = item_log.SEGMENT_PREFIX
__all__ = ["DELETE", "UPSERT", "ItemStore", "NewItem", "decode_vector", "encode_vector"]
# Re-encoding after a model rollout: items per Triton call.
REENCODE_BATCH = 32

Encoder = Callable[[list[ItemRow]], Awaitable[npt.NDArray[np.float32]]]
Key = tuple[float, str, int, int]


@dataclass(frozen=True)
class NewItem:
    """One validated UpsertItems item, with the text the encoder reads."""

    item_id: str
    fields: ItemFields
    text: str
    attributes: dict[str, str] = field(default_factory=dict)
    image_path: str = ""
    image_bytes: int = 0
    image_encoded: bool = False  # its image went into its vector
    available: bool = True  # Item.available: what ItemFilter.available_only reads


@dataclass
class _Entry:
    key: Key
    deleted: bool
    title: str = ""
    text: str = ""
    fields: ItemFields | None = None  # for re-encoding (the attributes)
    # None: encoded by another model version (or not at all): waiting to be re-encoded.
    vector: npt.NDArray[np.float32] | None = None
    # The image encoder's output for the item's photo (None: none), for re-encoding.
    image_features: npt.NDArray[np.float32] | None = None
    available: bool = True


def encode_vector(vector: npt.NDArray[np.float32]) -> str:
    """Little-endian float32 bytes, base64: exact and compact in a JSON line."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str, dim: int) -> npt.NDArray[np.float32] | None:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    if len(raw) != 4 * dim:
        return None
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return vector if np.isfinite(vector).all() else None


class ItemStore:
    """The overlay of added and hidden items over the trained catalogue, kept in sync with the
    shared directory. `catalogue` is the snapshot to serve a request with (immutable)."""

    def __init__(
        self,
        directory: Path,
        trained: Catalogue,
        metadata: ModelMetadata,
        *,
        replica: str = "",
        poll_interval_seconds: float = 1.0,
        max_segment_bytes: int = 64 * 1024 * 1024,
        max_overlay_items: int = 10_000,
        compact_tail_bytes: int = 0,
        compact_tail_records: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.replica = replica_name(replica)
        self.poll_interval_seconds = poll_interval_seconds
        self.max_segment_bytes = max_segment_bytes
        self.max_overlay_items = max_overlay_items
        # Compaction thresholds (0: never automatically).
        self.compact_tail_bytes = compact_tail_bytes
        self.compact_tail_records = compact_tail_records
        self._trained = trained
        self._model_version = metadata.model_version
        self._dim = metadata.embedding_dim
        self._entries: dict[str, _Entry] = {}
        self._reader = ItemLogReader(self.directory)
        self._log = SegmentWriter(
            self.directory,
            SEGMENT_PREFIX,
            self.replica,
            max_segment_bytes,
            on_new_segment=lambda path: logger.info("item store: writing %s", path.name),
        )
        self._catalogue = trained
        self._live_added = 0
        self._encoder: Encoder | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._line_segment = 0  # the segment `_line` counts in
        self._line = 0

    @property
    def catalogue(self) -> Catalogue:
        return self._catalogue

    def set_encoder(self, encoder: Encoder | None) -> None:
        """How records encoded by another model version get re-encoded (None: they wait)."""
        self._encoder = encoder

    # --- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        """Creates the directory and reads every segment; call before serving."""
        try:
            self._log.open()
            # A compacted segment's name must never come back (`ltrec_core.item_log`).
            covered = item_log.covered_sequence(self.directory, self.replica)
            self._log.sequence = max(self._log.sequence, covered)
            records = self._scan()
        except (OSError, ItemLogError) as exc:
            raise StartupError(
                f"LTREC_ITEMS_DIR: cannot use {self.directory}: "
                f"{exc.strerror if isinstance(exc, OSError) else exc}"
            ) from exc
        self._apply(records)
        logger.info(
            "item store %s: %d added items, %d hidden trained items, %d to re-encode",
            self.directory,
            self._live_added,
            self._catalogue.hidden.size,
            self._pending_count(),
        )

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="item-store-poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        async with self._lock:
            await asyncio.to_thread(self._log.close)

    # --- queries -------------------------------------------------------------------------------
    def knows(self, item_id: str) -> bool:
        """A trained item or one the store has a record of (deleted ones included)."""
        return item_id in self._trained.index_of or item_id in self._entries

    def check_capacity(self, item_ids: Iterable[str]) -> None:
        """Overloaded when upserting these would take the overlay past its bound."""
        new = {
            i
            for i in item_ids
            if (e := self._entries.get(i)) is None or e.deleted or e.vector is None
        }
        if self._live_added + len(new) > self.max_overlay_items:
            raise Overloaded(
                f"the item overlay holds {self._live_added} of at most {self.max_overlay_items} "
                "added items; retrain (or raise LTREC_ITEMS_MAX_OVERLAY) to add more"
            )

    # --- writing -------------------------------------------------------------------------------
    async def upsert(
        self,
        items: list[NewItem],
        vectors: npt.NDArray[np.float32],
        request_id: str,
        image_features: Sequence[npt.NDArray[np.float32] | None] | None = None,
    ) -> None:
        """Returns once every record is on disk and applied here; BackendUnavailable if not."""
        records: list[ItemRecord] = [
            ItemUpsertRecord(
                item_id=item.item_id,
                title=item.fields.title,
                description=item.fields.description,
                category=item.fields.category,
                brand=item.fields.brand,
                price_bucket=item.fields.price_bucket,
                attributes=item.attributes,
                image_path=item.image_path,
                image_bytes=item.image_bytes,
                image_encoded=item.image_encoded,
                text=item.text,
                vector=encode_vector(vector),
                image_features=None if features is None else encode_vector(features),
                model_version=self._model_version,
                request_id=request_id,
                available=item.available,
            )
            for item, vector, features in zip(
                items, vectors, image_features or [None] * len(items), strict=True
            )
        ]
        await self._append(records)
        metrics.ITEM_UPDATES_TOTAL.labels(op="upsert").inc(len(records))

    async def delete(self, item_ids: list[str], request_id: str) -> None:
        records: list[ItemRecord] = [
            ItemDeleteRecord(item_id=item_id, request_id=request_id) for item_id in item_ids
        ]
        await self._append(records)
        metrics.ITEM_UPDATES_TOTAL.labels(op="delete").inc(len(records))

    async def _append(self, unplaced: list[ItemRecord]) -> None:
        async with self._lock:
            try:
                segment = await asyncio.to_thread(self._log.begin)
                if segment != self._line_segment:
                    self._line_segment, self._line = segment, 0
                now = time.time()
                records: list[ItemRecord] = []
                for record in unplaced:
                    self._line += 1
                    position = LogPosition(
                        ts=now, replica=self.replica, segment=segment, line=self._line
                    )
                    records.append(dataclasses.replace(record, position=position))
                data = encode_lines([r.to_json() for r in records])
                await asyncio.to_thread(self._log.write, data)
            except OSError as exc:
                metrics.ITEM_STORE_WRITE_ERRORS_TOTAL.inc()
                logger.error("item store: write failed: %s", exc)
                raise BackendUnavailable(
                    f"the item store cannot write ({exc.strerror}); retry (upserts and deletes "
                    "are idempotent)"
                ) from exc
            self._apply(records)

    # --- reading (worker threads) ---------------------------------------------------------
    def _scan(self) -> list[ItemRecord]:
        """Complete lines appended to any segment since the last scan (a torn or unfinished
        last line waits)."""
        records: list[ItemRecord] = []
        for segment, data in self._reader.read():
            record = _parse(data)
            if record is None:
                if data.strip(b"\0"):
                    metrics.ITEM_STORE_UNREADABLE_LINES_TOTAL.inc()
                    logger.warning("item store: %s has an unreadable line; skipped", segment.name)
                continue
            records.append(record)
        metrics.ITEM_STORE_BYTES.set(item_log.store_bytes(self.directory))
        return records

    def _tail(self) -> tuple[int, int]:
        return self._reader.tail(self.replica)

    # --- compaction ------------------------------------------------------------------------------
    async def compact(self) -> Compaction | None:
        """Closes this replica's segment and folds the closed segments into a new snapshot
        (`ltrec_core.item_log.compact`); None when there was nothing to fold. Never raises:
        a failure is counted and logged, and the records stay where they are."""
        async with self._lock:
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self._log.close)
                done = await asyncio.to_thread(item_log.compact, self.directory)
            except (OSError, ItemLogError) as exc:
                metrics.ITEM_STORE_COMPACTIONS_TOTAL.labels(result="error").inc()
                logger.error("item store: compaction failed: %s", exc)
                return None
        if done is None:
            metrics.ITEM_STORE_COMPACTIONS_TOTAL.labels(result="skipped").inc()
            return None
        metrics.ITEM_STORE_COMPACTIONS_TOTAL.labels(result="ok").inc()
        metrics.ITEM_STORE_BYTES.set(done.bytes_after)
        logger.info(
            "item store: compacted %d segments (%d records) into generation %d (%d records) in "
            "%.3f s; %d -> %d bytes",
            done.segments,
            done.records_read,
            done.generation,
            done.records_kept,
            time.perf_counter() - started,
            done.bytes_before,
            done.bytes_after,
        )
        return done

    async def _maybe_compact(self) -> None:
        if not (self.compact_tail_bytes or self.compact_tail_records):
            return
        size, records = await asyncio.to_thread(self._tail)
        if (self.compact_tail_bytes and size >= self.compact_tail_bytes) or (
            self.compact_tail_records and records >= self.compact_tail_records
        ):
            await self.compact()

    # --- state -----------------------------------------------------------------------------------
    def _apply(self, records: Sequence[ItemRecord | dict[str, Any]]) -> None:
        """Applies records, typed or as the JSON objects of their lines."""
        changed = False
        for given in records:
            record = item_record_from_json(given) if isinstance(given, dict) else given
            assert record.position is not None  # placed when written, required when read
            key: Key = record.position.key
            item_id = record.item_id
            current = self._entries.get(item_id)
            if current is not None and current.key >= key:
                continue
            if isinstance(record, ItemDeleteRecord):
                self._entries[item_id] = _Entry(key, deleted=True)
            else:
                vector = None
                if record.model_version == self._model_version:
                    vector = decode_vector(record.vector, self._dim)
                self._entries[item_id] = _Entry(
                    key,
                    deleted=False,
                    title=record.title,
                    text=record.text,
                    fields=_fields(record),
                    vector=vector,
                    image_features=_image_features(record),
                    available=record.available,
                )
            changed = True
        if changed:
            self._rebuild()

    def _rebuild(self) -> None:
        trained = self._trained
        ids: list[str] = []
        titles: list[str] = []
        vectors: list[npt.NDArray[np.float32]] = []
        popularity: list[int] = []
        long_tail: list[bool] = []
        hidden: list[int] = []
        facets: list[FacetRow] = []
        unserved: list[str] = []  # added items not served now: known to filters
        for item_id, entry in self._entries.items():
            trained_index = trained.index_of.get(item_id)
            if entry.deleted:
                if trained_index is not None:
                    hidden.append(trained_index)
                else:
                    unserved.append(item_id)
                continue
            if entry.vector is None:  # until re-encoded, a trained item stays as trained
                if trained_index is None:
                    unserved.append(item_id)
                continue
            ids.append(item_id)
            titles.append(entry.title)
            vectors.append(entry.vector)
            fields = entry.fields or ItemFields(title=entry.title)
            facets.append(
                FacetRow(
                    category=fields.category,
                    brand=fields.brand,
                    price_bucket=fields.price_bucket,
                    available=entry.available,
                )
            )
            if trained_index is None:
                popularity.append(0)
                long_tail.append(True)
            else:  # replaced: the added row keeps what training knew of its popularity
                hidden.append(trained_index)
                popularity.append(int(trained.popularity[trained_index]))
                long_tail.append(bool(trained.long_tail[trained_index]))
        self._catalogue = trained.with_overlay(
            ids,
            titles,
            np.asarray(vectors, dtype=np.float32).reshape(len(ids), self._dim),
            np.asarray(popularity, dtype=np.int64),
            np.asarray(long_tail, dtype=np.bool_),
            np.asarray(hidden, dtype=np.int64),
            facets,
            unserved,
        )
        self._live_added = len(ids)
        metrics.OVERLAY_ITEMS.set(len(ids))
        metrics.HIDDEN_ITEMS.set(self._catalogue.hidden.size)
        metrics.ITEMS_PENDING_ENCODING.set(self._pending_count())

    def _pending_count(self) -> int:
        return sum(1 for e in self._entries.values() if not e.deleted and e.vector is None)

    # --- polling ---------------------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_seconds)
            try:
                records = await asyncio.to_thread(self._scan)
                if records:
                    self._apply(records)
                await self._maybe_compact()
                await self._reencode()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("item store poll failed; retrying")

    async def _reencode(self) -> None:
        """Encodes, with this model, a batch of items another model version encoded."""
        if self._encoder is None:
            return
        pending = [
            (item_id, entry)
            for item_id, entry in self._entries.items()
            if not entry.deleted and entry.vector is None and entry.text
        ][:REENCODE_BATCH]
        if not pending:
            return
        try:
            vectors = await self._encoder(
                [
                    ItemRow.of(
                        entry.fields or ItemFields(title=entry.title),
                        entry.text,
                        image_features=entry.image_features,
                    )
                    for _, entry in pending
                ]
            )
        except GatewayError as exc:
            logger.info("item store: re-encoding %d items failed (%s); retrying", len(pending), exc)
            return
        for (item_id, entry), vector in zip(pending, vectors, strict=True):
            if self._entries.get(item_id) is entry:  # not replaced meanwhile
                entry.vector = np.asarray(vector, dtype=np.float32)
        self._rebuild()


def _image_features(record: ItemUpsertRecord) -> npt.NDArray[np.float32] | None:
    if record.image_features is None:
        return None
    return decode_vector(record.image_features, contract.IMAGE_FEATURE_DIM)


def _fields(record: ItemUpsertRecord) -> ItemFields:
    return ItemFields(
        title=record.title,
        description=record.description,
        category=record.category,
        brand=record.brand,
        price_bucket=record.price_bucket,
    )


def _parse(line: bytes) -> ItemRecord | None:
    """A complete, well-formed record, or None."""
    try:
        return item_record_from_json(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError, RecordError):
        return None
