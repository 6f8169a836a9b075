"""The records the gateway's stores write, one typed schema each, written and read only here.

The feedback log (`server.stores.feedback`, read back by `ltrec.retrain`) holds `FeedbackRecord`,
`ServedRecord` and `UserErasureRecord` (ForgetUser's tombstones, `ltrec_core.erasure`); the item
log (`server.stores.items`) holds `ItemUpsertRecord` and `ItemDeleteRecord`. Each is a JSON
object on one line of a segment (`ltrec_core.segment_log`), with a `kind` naming its type.

Versions: the records as first written are version 1 and carry no version field, so the files
written before the schemas were declared read as they are. A later version writes
``"schema_version": N``; a reader refuses a version it does not know (`RecordError`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

# Record kinds.
FEEDBACK = "feedback"
SERVED = "served"
ERASURE = "user_erasure"
UPSERT = "item_upsert"
DELETE = "item_delete"


class RecordError(ValueError):
    """A JSON object that is not a complete record of the expected kind and version."""


def _check_version(raw: dict[str, Any]) -> None:
    version = raw.get("schema_version", 1)
    if version != SCHEMA_VERSION:
        raise RecordError(f"schema_version {version!r} is not {SCHEMA_VERSION}")


@dataclass(frozen=True)
class FeedbackRecord:
    """One Feedback event as the gateway acknowledged it (`kind` "feedback")."""

    request_id: str
    user_id: str
    item_id: str
    type: str  # click, cart, purchase, impression (the proto's FeedbackType, lower case)
    timestamp: int  # the event's epoch seconds (the gateway's clock where the caller gave none)
    position: int | None
    device: str
    region: str
    model_version: str
    received_at: float

    def to_json(self) -> dict[str, Any]:
        return {"kind": FEEDBACK, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FeedbackRecord:
        """Tolerant of missing context (older lines): device and region default to empty."""
        _check_version(raw)
        if raw.get("kind") != FEEDBACK:
            raise RecordError(f"kind must be {FEEDBACK!r}, got {raw.get('kind')!r}")
        try:
            return cls(
                request_id=str(raw.get("request_id", "")),
                user_id=str(raw["user_id"]),
                item_id=str(raw["item_id"]),
                type=str(raw["type"]),
                timestamp=int(raw["timestamp"]),
                position=None if raw.get("position") is None else int(raw["position"]),
                device=str(raw.get("device") or ""),
                region=str(raw.get("region") or ""),
                model_version=str(raw.get("model_version", "")),
                received_at=float(raw.get("received_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"not a feedback record: {exc!r}") from None


@dataclass(frozen=True)
class ServedRecord:
    """A list Recommend served (`kind` "served"): exposure, not interactions."""

    request_id: str
    user_id: str
    items: list[str]
    model_version: str
    timestamp: int
    device: str
    region: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": SERVED, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class UserErasureRecord:
    """ForgetUser's tombstone (`kind` "user_erasure"): retraining skips every record of the user
    whose keyed hash `user_key` is (`ltrec_core.erasure`). It never holds the user id in clear."""

    user_key: str  # HMAC-SHA256 (64 hex digits) of the user id under the log's erasure key
    key_id: str  # which erasure key (`ltrec_core.erasure.key_id`)
    request_id: str
    erased_at: float  # the gateway's clock, epoch seconds

    def to_json(self) -> dict[str, Any]:
        return {"kind": ERASURE, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> UserErasureRecord:
        """Strict: an erasure that cannot be read must stop a retraining, not be skipped."""
        _check_version(raw)
        if raw.get("kind") != ERASURE:
            raise RecordError(f"kind must be {ERASURE!r}, got {raw.get('kind')!r}")
        user_key, key_id = raw.get("user_key"), raw.get("key_id")
        if not (isinstance(user_key, str) and len(user_key) == 64 and _is_hex(user_key)):
            raise RecordError("an erasure record needs user_key: 64 hex digits")
        if not (isinstance(key_id, str) and key_id):
            raise RecordError("an erasure record needs a key_id")
        try:
            erased_at = float(raw.get("erased_at", 0.0))
        except (TypeError, ValueError):
            raise RecordError("an erasure record's erased_at must be a number") from None
        return cls(
            user_key=user_key,
            key_id=key_id,
            request_id=_text(raw, "request_id"),
            erased_at=erased_at,
        )


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class LogPosition:
    """Where an item record was written; (ts, replica, segment, line) is its LWW key."""

    ts: float
    replica: str
    segment: int
    line: int

    @property
    def key(self) -> tuple[float, str, int, int]:
        return (self.ts, self.replica, self.segment, self.line)


@dataclass(frozen=True)
class ItemUpsertRecord:
    """An item added (or replaced) by UpsertItems, with the vector the serving model encoded.

    `vector` and `image_features` are little-endian float32, base64 (`server.stores.items`
    encodes and decodes them); the image bytes are never kept, only the frozen image encoder's
    output, so a rollout re-runs only the item encoder's trained fusion.
    """

    item_id: str
    title: str
    description: str
    category: str
    brand: str
    price_bucket: str
    attributes: dict[str, str]
    image_path: str
    image_bytes: int
    image_encoded: bool
    text: str
    vector: str
    image_features: str | None
    model_version: str
    request_id: str
    # Item.available (in stock); records written before it existed read as available.
    available: bool = True
    position: LogPosition | None = None

    def to_json(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        position = fields.pop("position")
        return {"kind": UPSERT, **fields, **_position_json(position)}


@dataclass(frozen=True)
class ItemDeleteRecord:
    """An item hidden by DeleteItems."""

    item_id: str
    request_id: str
    position: LogPosition | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": DELETE,
            "item_id": self.item_id,
            "request_id": self.request_id,
            **_position_json(self.position),
        }


ItemRecord = ItemUpsertRecord | ItemDeleteRecord


def _position_json(position: LogPosition | None) -> dict[str, Any]:
    return {} if position is None else dataclasses.asdict(position)


def item_record_from_json(raw: object) -> ItemRecord:
    """A complete, well-formed item record; `RecordError` otherwise.

    The kind, the position and the item id must be right; the other fields are read leniently
    (a text field that is not a string is empty, a vector that is not a string is missing), as
    the item store always has: one odd field must not lose an item on every replica.
    """
    if not isinstance(raw, dict) or raw.get("kind") not in (UPSERT, DELETE):
        raise RecordError("not an item record")
    _check_version(raw)
    try:
        position = LogPosition(
            ts=float(raw["ts"]),
            replica=raw["replica"],
            segment=int(raw["segment"]),
            line=int(raw["line"]),
        )
    except (KeyError, TypeError, ValueError):
        raise RecordError("an item record needs ts, replica, segment and line") from None
    if not isinstance(raw.get("item_id"), str) or not isinstance(position.replica, str):
        raise RecordError("an item record needs a string item_id and replica")
    if raw["kind"] == DELETE:
        return ItemDeleteRecord(
            item_id=raw["item_id"], request_id=_text(raw, "request_id"), position=position
        )
    features = raw.get("image_features")
    attributes = raw.get("attributes")
    return ItemUpsertRecord(
        item_id=raw["item_id"],
        title=_text(raw, "title"),
        description=_text(raw, "description"),
        category=_text(raw, "category"),
        brand=_text(raw, "brand"),
        price_bucket=_text(raw, "price_bucket"),
        attributes=attributes if isinstance(attributes, dict) else {},
        image_path=_text(raw, "image_path"),
        image_bytes=raw["image_bytes"] if isinstance(raw.get("image_bytes"), int) else 0,
        image_encoded=raw.get("image_encoded") is True,
        text=_text(raw, "text"),
        vector=str(raw.get("vector", "")),
        image_features=features if isinstance(features, str) else None,
        model_version=_text(raw, "model_version"),
        request_id=_text(raw, "request_id"),
        available=raw.get("available") is not False,
        position=position,
    )


def _text(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    return value if isinstance(value, str) else ""


@dataclass
class ReadStats:
    """What reading the feedback log found (`ltrec_core.feedback_log.read_records`)."""

    segments: int = 0
    records: int = 0
    # Lines that are not a complete record: a crash mid-write leaves such a line (or a run of
    # NUL bytes) at the end of a segment. They were never acknowledged.
    unreadable_lines: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
