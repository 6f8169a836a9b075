"""Erasing a user from the feedback log (ForgetUser): tombstones that every retraining honours.

The feedback log is training data and holds user ids in clear (`FeedbackRecord.user_id`,
`ServedRecord.user_id`). Erasing a user appends one `UserErasureRecord` (a tombstone) to the log
through the feedback store's durable append (fsync'd before ForgetUser answers OK), and
`ltrec.retrain merge` drops every feedback record and served list of an erased user as it reads
the log (`Erasures`).

Why a tombstone rather than rewriting the segments without the user's lines:

* Crashes. One appended line is all or nothing: a torn last line was never acknowledged, and the
  caller retries (ForgetUser is idempotent). A rewrite is a copy, an fsync and a rename per
  segment, and a crash between two segments leaves a half-erased log that nothing on disk tells
  apart from a finished one.
* Concurrent writers. Each replica appends to its own open segment through a descriptor it keeps;
  renaming a rewritten copy over that file would send the replica's next acknowledged records to
  an unlinked inode, i.e. lose them. A rewrite could touch only closed segments, and another
  replica's only under a lock the log does not have. A tombstone touches nothing but this
  replica's own segment, in the order of its other writes.
* No ordering between replicas. A tombstone matches every record of the user, wherever and
  whenever it was written: records of other replicas, records in flight while the erasure is
  written, records stamped "later" by a replica whose clock is ahead. The price: an erased id
  stays out of retraining, also for what the user does after the erasure.
* Readers. A retraining that reads the log meanwhile sees the tombstone or not, never a
  half-written file; the next one honours it.

A tombstone holds no user id in clear: `user_key` is the HMAC-SHA256 of the id under the log's
own erasure key (`KEY_FILE` in the log directory: 32 random bytes, made once by the first
erasure, `load_or_create_key`, and shared by every replica writing to the directory). The key
lives with the log because a retraining must compute the same hash from each record's id, and
must not depend on the gateway's LTREC_USER_HASH_KEY, which may be random per process. Whoever
can read the log reads the ids in clear anyway; the key keeps the id out of the erasure record
and of anything that copies it. Each tombstone names its key (`key_id`), and a log whose
tombstones do not match its key file is refused (`ErasureError`): a lost or replaced key must
never let an erased user back into training.

A record is erased when the keyed hash of its user_id is a tombstone's `user_key`, or when its
user_id already is such a hash (a record that stores the keyed hash instead of the id).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import Counter
from pathlib import Path

from ltrec_core import segment_log
from ltrec_core.feedback_log import SEGMENT_PREFIX
from ltrec_core.records import FEEDBACK, SERVED, UserErasureRecord

KEY_FILE = "erasure.key"
KEY_BYTES = 32


class ErasureError(ValueError):
    """The log's erasures cannot be honoured: its key file is missing, unreadable, or not the key
    its tombstones were written with."""


def user_key(user_id: str, key: bytes) -> str:
    """A tombstone's `user_key`: HMAC-SHA256 of the user id, 64 hex digits."""
    return hmac.new(key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """Names a key without revealing it (tombstones carry it; readers check it)."""
    return hmac.new(key, b"ltrec erasure key id", hashlib.sha256).hexdigest()[:16]


def read_key(directory: Path) -> bytes | None:
    """The log's erasure key; None when the log has none (nothing was ever erased)."""
    path = Path(directory) / KEY_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ErasureError(f"{path}: cannot read the erasure key ({exc})") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ErasureError(f"{path}: not an erasure key ({2 * KEY_BYTES} hex digits)")
    return key


def load_or_create_key(directory: Path, replica: str) -> bytes:
    """The log's erasure key, made on first use. Crash- and race-safe: the key is written to a
    file of this process, fsync'd, then hard-linked into place (of replicas racing, one link
    wins and the others read its key), and the directory entry is fsync'd before it is used."""
    directory = Path(directory)
    key = read_key(directory)
    if key is not None:
        return key
    data = (secrets.token_hex(KEY_BYTES) + "\n").encode("ascii")
    if not segment_log.publish(directory, KEY_FILE, data, mode=0o640, writer=replica):
        segment_log.fsync_directory(directory)  # another replica's key: durable before it is used
    key = read_key(directory)
    if key is None:
        raise ErasureError(f"{directory / KEY_FILE}: vanished as it was made")
    return key


def tombstone(user_id: str, key: bytes, request_id: str, erased_at: float) -> UserErasureRecord:
    return UserErasureRecord(
        user_key=user_key(user_id, key),
        key_id=key_id(key),
        request_id=request_id,
        erased_at=erased_at,
    )


class Erasures:
    """The users erased from one log, and the test a reader applies to each record's user id."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._key = read_key(self.directory)
        self._key_id = None if self._key is None else key_id(self._key)
        self.user_keys: set[str] = set()
        self.records = 0
        self._erased: dict[str, bool] = {}

    def add(self, record: UserErasureRecord) -> None:
        """Raises ErasureError when the tombstone cannot be checked against this log's key."""
        if self._key_id is None:
            raise ErasureError(
                f"{self.directory}: the log has erasure records but no {KEY_FILE}; without it "
                "the erased users cannot be told apart (restore the key file)"
            )
        if record.key_id != self._key_id:
            raise ErasureError(
                f"{self.directory}: an erasure record (request {record.request_id!r}) was "
                f"written with key {record.key_id}, but {KEY_FILE} is key {self._key_id} "
                "(restore the key file it was written with)"
            )
        self.user_keys.add(record.user_key)
        self.records += 1

    def erased(self, user_id: str) -> bool:
        if not self.user_keys:
            return False
        known = self._erased.get(user_id)
        if known is None:
            assert self._key is not None  # there are tombstones, so add() found the key
            known = user_id in self.user_keys or user_key(user_id, self._key) in self.user_keys
            self._erased[user_id] = known
        return known


def count_user_records(directory: Path, user_id: str) -> Counter[str]:
    """The complete feedback and served records of `user_id` in the log now, by kind: what
    ForgetUser reports as erased. Reads each segment once; only the segments, then the lines,
    that hold the id's JSON text are parsed, and the id must then equal the record's exactly."""
    needles = {
        json.dumps(user_id, ensure_ascii=False).encode("utf-8", "surrogatepass"),
        json.dumps(user_id).encode("ascii"),
    }
    counts: Counter[str] = Counter()
    for path in segment_log.segments(Path(directory), SEGMENT_PREFIX):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        if not any(needle in data for needle in needles):
            continue
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is not counted
        for line in complete.split(b"\n"):
            if not any(needle in line for needle in needles):
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if (
                isinstance(record, dict)
                and record.get("kind") in (FEEDBACK, SERVED)
                and record.get("user_id") == user_id
            ):
                counts[record["kind"]] += 1
    return counts
