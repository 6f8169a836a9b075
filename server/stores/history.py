"""The history store: each user's recent events, so that a Recommend with only a user_id works.

What goes in: the clicks, carts and purchases of acknowledged `Feedback`/`FeedbackBatch` calls, and
the history of a `Recommend` sent with `remember_history`. What comes out: the user's events of
the last `retention_seconds` (or fewer, by request), oldest first, at most `max_events` (the
model's max history). Users are keyed by `server.hashing.user_key`, a keyed hash: the store never
holds a user id in clear. Item ids are kept as given (they are what the model reads).

Beside the events, each user has an entry (`UserEntry`): the user id sealed under the hash key
(`server.hashing.seal_user_id`: encrypted, so that Audience can answer with the caller's ids), a
version that every write to the user's events changes, and the newest event's time. Audience
lists the most recently active users (`known_users`) and reads their histories (`histories`);
`forget` deletes the entry with the events, so an erased user is in no audience.

The same rules hold in every backend (`HistoryBackend`), so that tests can hold them to it:

* an event is (timestamp, event type, item id); one equal to an event already kept is not kept
  twice (a caller that re-sends a history, or retries a Feedback, adds nothing);
* events are ordered by timestamp, then by arrival (a tie keeps the order it was given in);
* a user keeps the newest `max_events`; events older than the retention are never returned and
  are pruned.

Backends: `server.stores.history_sqlite` (the embedded default: one SQLite file in WAL mode that
survives restarts, for one machine) and `server.stores.history_redis` (Redis, shared by
replicas). The store is an optimisation of serving, not a record: a backend that fails (Redis
down, disk full) makes reads return no history and writes be dropped, both counted in
`ltrec_gateway_history_store_errors_total`, and never fails an RPC. The durable record of
feedback stays the feedback store. The one exception is `forget` (ForgetUser): an erasure must
not be reported done when it was not, so its failure is raised (UNAVAILABLE; the call is
idempotent and is retried).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from server import metrics
from server.errors import BackendUnavailable
from server.hashing import open_user_id, seal_user_id, user_key

logger = logging.getLogger(__name__)

# Bounds of the retention (LTREC_HISTORY_RETENTION_SECONDS): a minute to a year.
MIN_RETENTION_SECONDS = 60
MAX_RETENTION_SECONDS = 365 * 24 * 3600
DEFAULT_RETENTION_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True)
class StoredEvent:
    """One kept event; `event_type` is a name of `ltrec_core.contract.EVENT_TYPES`."""

    timestamp: int
    event_type: str
    item_id: str


@dataclass(frozen=True)
class UserEntry:
    """A user the backend keeps events of: their store key, their sealed id (None: kept
    before ids were), a version that changes with every write to their events, and the
    timestamp of their newest event."""

    key: str
    sealed_id: str | None
    version: int
    newest: int


@dataclass(frozen=True)
class KnownUser:
    """A user the store knows, for Audience: the store key, the caller's id (None: it cannot
    be opened: kept before ids were, or under another hash key) and the entry's version."""

    key: str
    user_id: str | None
    version: int


class HistoryBackendError(Exception):
    """A backend could not read or write (unreachable, timed out, I/O error)."""


class HistoryBackend(Protocol):
    """Storage of events by user key, with the rules of this module's docstring."""

    async def read(self, key: str, since: int, limit: int) -> list[StoredEvent]:
        """The newest `limit` events of `key` with timestamp >= `since`, oldest first."""
        ...

    async def append(
        self,
        events: Mapping[str, Sequence[StoredEvent]],
        now: int,
        keep: int,
        retention: int,
        sealed_ids: Mapping[str, str] | None = None,
    ) -> None:
        """Adds events per key, keeps each key's newest `keep` and drops those older than
        `now - retention`; updates each key's entry (a new version, the newest time, and the
        sealed id given for it, if any). Raises HistoryBackendError when nothing could be
        written."""
        ...

    async def forget(self, key: str) -> int:
        """Deletes every event and the entry of `key` at once (durably, where the backend can);
        returns how many events there were. Raises HistoryBackendError when it could not."""
        ...

    async def users(self, since: int, limit: int) -> list[UserEntry]:
        """The entries whose newest event is at or after `since`, newest first, at most
        `limit`. Raises HistoryBackendError when it could not read them."""
        ...

    async def read_many(
        self, keys: Sequence[str], since: int, limit: int
    ) -> dict[str, list[StoredEvent]]:
        """`read` of each key (keys without events map to []). Raises HistoryBackendError."""
        ...

    async def close(self) -> None: ...


def merge_events(
    kept: Sequence[StoredEvent], new: Iterable[StoredEvent], since: int, keep: int
) -> list[StoredEvent]:
    """The module's rules in one place: dedupe, order by (timestamp, arrival), prune, bound."""
    seen: set[StoredEvent] = set()
    merged: list[StoredEvent] = []
    for event in (*kept, *new):
        if event.timestamp >= since and event not in seen:
            seen.add(event)
            merged.append(event)
    merged.sort(key=lambda e: e.timestamp)  # stable: arrival order within a timestamp
    return merged[-keep:] if keep > 0 else []


class HistoryStore:
    """Hashes user ids, applies the bounds, and turns backend failures into counted no-ops."""

    def __init__(
        self,
        backend: HistoryBackend,
        hash_key: bytes,
        *,
        max_events: int,
        retention_seconds: int,
        name: str,
    ) -> None:
        self.backend = backend
        self.max_events = max_events
        self.retention_seconds = retention_seconds
        self.name = name  # "sqlite" or "redis", for the start-up log line
        self._hash_key = hash_key
        self._read_errors = metrics.HISTORY_STORE_ERRORS_TOTAL.labels(op="read")
        self._write_errors = metrics.HISTORY_STORE_ERRORS_TOTAL.labels(op="write")
        self._forget_errors = metrics.HISTORY_STORE_ERRORS_TOTAL.labels(op="forget")
        self._users_errors = metrics.HISTORY_STORE_ERRORS_TOTAL.labels(op="users")

    def key_of(self, user_id: str) -> str:
        """The store key of a (non-empty) user id."""
        return user_key(user_id, self._hash_key)

    async def recent(
        self, user_id: str, now: float, max_age_seconds: int | None = None
    ) -> list[StoredEvent]:
        """The user's kept events, oldest first; [] when none, or when the backend failed."""
        age = self.retention_seconds if max_age_seconds is None else max_age_seconds
        since = int(now) - min(age, self.retention_seconds)
        key = user_key(user_id, self._hash_key)
        try:
            return await self.backend.read(key, since, self.max_events)
        except HistoryBackendError as exc:
            self._read_errors.inc()
            logger.warning("history store (%s): read failed, serving without: %s", self.name, exc)
            return []

    async def remember(
        self, events: Iterable[tuple[str, StoredEvent]], now: float | None = None
    ) -> int:
        """Keeps (user_id, event) pairs; returns how many were handed to the backend (0 when it
        failed: counted and logged, never raised)."""
        by_key: dict[str, list[StoredEvent]] = {}
        sealed: dict[str, str] = {}
        for user_id, event in events:
            key = user_key(user_id, self._hash_key)
            if key not in sealed:
                sealed[key] = seal_user_id(user_id, self._hash_key)
            by_key.setdefault(key, []).append(event)
        if not by_key:
            return 0
        moment = int(time.time() if now is None else now)
        try:
            await self.backend.append(
                by_key, moment, self.max_events, self.retention_seconds, sealed_ids=sealed
            )
        except HistoryBackendError as exc:
            self._write_errors.inc()
            logger.warning("history store (%s): write failed, events not kept: %s", self.name, exc)
            return 0
        written = sum(len(v) for v in by_key.values())
        metrics.HISTORY_EVENTS_WRITTEN_TOTAL.inc(written)
        return written

    async def forget(self, user_id: str) -> int:
        """Deletes the user's events (every replica sharing the backend sees it at once);
        returns how many there were. BackendUnavailable (counted, logged) when it could not."""
        try:
            return await self.backend.forget(user_key(user_id, self._hash_key))
        except HistoryBackendError as exc:
            self._forget_errors.inc()
            logger.warning("history store (%s): forget failed: %s", self.name, exc)
            raise BackendUnavailable(
                f"the history store ({self.name}) cannot delete the user's history now; retry"
            ) from exc

    async def known_users(self, now: float, limit: int) -> list[KnownUser]:
        """The users with events within the retention, most recently active first, at most
        `limit`, their ids opened. BackendUnavailable (counted, logged) when the backend
        cannot list them: an audience of no one would read as an answer."""
        since = int(now) - self.retention_seconds
        try:
            entries = await self.backend.users(since, limit)
        except HistoryBackendError as exc:
            self._users_errors.inc()
            logger.warning("history store (%s): listing users failed: %s", self.name, exc)
            raise BackendUnavailable(
                f"the history store ({self.name}) cannot list its users now; retry"
            ) from exc
        return [
            KnownUser(
                entry.key,
                None
                if entry.sealed_id is None
                else open_user_id(entry.sealed_id, entry.key, self._hash_key),
                entry.version,
            )
            for entry in entries
        ]

    async def histories(self, keys: Sequence[str], now: float) -> dict[str, list[StoredEvent]]:
        """The kept events of each store key (as `recent` reads one user's). BackendUnavailable
        (counted, logged) when the backend fails."""
        since = int(now) - self.retention_seconds
        try:
            return await self.backend.read_many(keys, since, self.max_events)
        except HistoryBackendError as exc:
            self._users_errors.inc()
            logger.warning("history store (%s): reading users failed: %s", self.name, exc)
            raise BackendUnavailable(
                f"the history store ({self.name}) cannot read its users now; retry"
            ) from exc

    async def close(self) -> None:
        await self.backend.close()
