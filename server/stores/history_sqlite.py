"""The embedded history backend: one SQLite file in WAL mode (stdlib `sqlite3`), no service.

For the single-machine stack: the file survives restarts, and several processes on the same
machine may share it (WAL: readers never wait for the writer; writers take turns, waiting up to
`busy_timeout_seconds`). Not for a network filesystem (WAL needs shared memory on one host):
replicas on several machines share Redis instead (`server.stores.history_redis`).

One row per event; `seq` (the rowid) is the arrival order, and the unique index on (user key,
timestamp, type, item) is both the dedupe of `server.stores.history` and the index reads use.
`synchronous=NORMAL`: a committed event survives a crash of the gateway; a power loss may lose
the last ones (the feedback store is the durable record).

`history_users` has one row per user with events: the sealed user id (`server.hashing`), a
version that every write to the user's events raises (Audience re-encodes a user whose version
changed) and the newest event's time (Audience scans the most recently active users first). A
write updates it in the same transaction as the events. Rows of schema version 1, which kept no
ids, get a row without one (NULL) on migration; their next event brings the id.

Forgetting a user (ForgetUser) is
stricter: its delete (events and user row, one transaction) commits with `synchronous=FULL` (a
power loss cannot bring the events back)
and `secure_delete` (their bytes are overwritten, not left in free pages; Debian's SQLite has
it on by default, other builds do not), then a
`wal_checkpoint(TRUNCATE)` moves the change into the main file and empties the WAL, which held
the old pages (best effort: a reader of another process may keep the WAL a while longer).
Schema version: `PRAGMA user_version`.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from server.errors import StartupError
from server.stores.history import HistoryBackendError, StoredEvent, UserEntry

SCHEMA_VERSION = 2
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS history_events ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " user_key TEXT NOT NULL,"
    " timestamp INTEGER NOT NULL,"
    " event_type TEXT NOT NULL,"
    " item_id TEXT NOT NULL,"
    " UNIQUE (user_key, timestamp, event_type, item_id))",
    "CREATE INDEX IF NOT EXISTS history_events_by_time ON history_events (timestamp)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS history_users ("
    " user_key TEXT PRIMARY KEY,"
    " sealed_id TEXT,"
    " version INTEGER NOT NULL,"
    " newest INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS history_users_by_newest ON history_users (newest)",
)
# Version 1 -> 2: every user with events gets a row, without a sealed id (none was kept).
_MIGRATE_FROM_1 = (
    "INSERT OR IGNORE INTO history_users (user_key, sealed_id, version, newest) "
    "SELECT user_key, NULL, 1, max(timestamp) FROM history_events GROUP BY user_key"
)
# The whole file is pruned of expired events at most this often (each write prunes its users).
PRUNE_INTERVAL_SECONDS = 300.0


class SqliteHistory:
    """`HistoryBackend` on one SQLite file; blocking work runs in worker threads."""

    def __init__(self, path: Path, *, busy_timeout_seconds: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout_seconds = busy_timeout_seconds
        # One connection for reads, one for writes, each used by one thread at a time.
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._last_prune = 0.0

    def open(self) -> None:
        """Creates the file and its schema; StartupError naming the variable when it cannot."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = self._connect()
            mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            with self._write_lock:
                self._writer.execute("BEGIN IMMEDIATE")
                try:
                    version = self._writer.execute("PRAGMA user_version").fetchone()[0]
                    if version not in (0, 1, SCHEMA_VERSION):
                        raise StartupError(
                            f"LTREC_HISTORY_SQLITE_PATH: {self.path} has schema version {version}, "
                            f"this gateway reads {SCHEMA_VERSION}"
                        )
                    for statement in _SCHEMA:
                        self._writer.execute(statement)
                    if version == 1:
                        self._writer.execute(_MIGRATE_FROM_1)
                except BaseException:
                    self._writer.execute("ROLLBACK")
                    raise
                self._writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._writer.execute("COMMIT")
            self._reader = self._connect()
        except (OSError, sqlite3.Error) as exc:
            self._close_connections()
            raise StartupError(f"LTREC_HISTORY_SQLITE_PATH: cannot use {self.path}: {exc}") from exc

    def hash_key(self) -> str:
        """The user hash key kept in the file, made on first use: without LTREC_USER_HASH_KEY,
        users still find their history after a restart."""
        assert self._writer is not None, "open() first"
        with self._write_lock:
            self._writer.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('user_hash_key', ?)",
                (secrets.token_hex(32),),
            )
            row = self._writer.execute(
                "SELECT value FROM meta WHERE name = 'user_hash_key'"
            ).fetchone()
        return str(row[0])

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_seconds,
            isolation_level=None,  # autocommit; writes open their own transactions
            check_same_thread=False,  # used from worker threads, one at a time (locks)
        )
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    # --- HistoryBackend ------------------------------------------------------------------------
    async def read(self, key: str, since: int, limit: int) -> list[StoredEvent]:
        return await asyncio.to_thread(self.read_now, key, since, limit)

    async def append(
        self,
        events: Mapping[str, Sequence[StoredEvent]],
        now: int,
        keep: int,
        retention: int,
        sealed_ids: Mapping[str, str] | None = None,
    ) -> None:
        await asyncio.to_thread(self.append_now, events, now, keep, retention, sealed_ids or {})

    async def forget(self, key: str) -> int:
        return await asyncio.to_thread(self.forget_now, key)

    async def users(self, since: int, limit: int) -> list[UserEntry]:
        return await asyncio.to_thread(self.users_now, since, limit)

    async def read_many(
        self, keys: Sequence[str], since: int, limit: int
    ) -> dict[str, list[StoredEvent]]:
        return await asyncio.to_thread(self.read_many_now, keys, since, limit)

    async def close(self) -> None:
        await asyncio.to_thread(self._close_connections)

    # --- the blocking halves -------------------------------------------------------------------
    def read_now(self, key: str, since: int, limit: int) -> list[StoredEvent]:
        if self._reader is None:
            raise HistoryBackendError("the SQLite history store is closed")
        try:
            with self._read_lock:
                rows = self._reader.execute(
                    "SELECT timestamp, event_type, item_id FROM history_events "
                    "WHERE user_key = ? AND timestamp >= ? ORDER BY timestamp DESC, seq DESC "
                    "LIMIT ?",
                    (key, since, limit),
                ).fetchall()
        except sqlite3.Error as exc:
            raise HistoryBackendError(f"{self.path}: {exc}") from exc
        return [StoredEvent(int(t), str(e), str(i)) for t, e, i in reversed(rows)]

    def read_many_now(
        self, keys: Sequence[str], since: int, limit: int
    ) -> dict[str, list[StoredEvent]]:
        return {key: self.read_now(key, since, limit) for key in dict.fromkeys(keys)}

    def users_now(self, since: int, limit: int) -> list[UserEntry]:
        if self._reader is None:
            raise HistoryBackendError("the SQLite history store is closed")
        try:
            with self._read_lock:
                rows = self._reader.execute(
                    "SELECT user_key, sealed_id, version, newest FROM history_users "
                    "WHERE newest >= ? ORDER BY newest DESC, user_key LIMIT ?",
                    (since, limit),
                ).fetchall()
        except sqlite3.Error as exc:
            raise HistoryBackendError(f"{self.path}: {exc}") from exc
        return [
            UserEntry(str(k), None if s is None else str(s), int(v), int(n)) for k, s, v, n in rows
        ]

    def append_now(
        self,
        events: Mapping[str, Sequence[StoredEvent]],
        now: int,
        keep: int,
        retention: int,
        sealed_ids: Mapping[str, str] | None = None,
    ) -> None:
        if self._writer is None:
            raise HistoryBackendError("the SQLite history store is closed")
        cutoff = now - retention
        try:
            with self._write_lock:
                self._writer.execute("BEGIN IMMEDIATE")
                try:
                    for key, user_events in events.items():
                        self._append_user(key, user_events, cutoff, keep)
                        self._update_user(key, (sealed_ids or {}).get(key))
                    if time.monotonic() - self._last_prune > PRUNE_INTERVAL_SECONDS:
                        self._writer.execute(
                            "DELETE FROM history_events WHERE timestamp < ?", (cutoff,)
                        )
                        self._writer.execute(
                            "DELETE FROM history_users WHERE newest < ?", (cutoff,)
                        )
                        self._last_prune = time.monotonic()
                except BaseException:
                    self._writer.execute("ROLLBACK")
                    raise
                self._writer.execute("COMMIT")
        except sqlite3.Error as exc:
            raise HistoryBackendError(f"{self.path}: {exc}") from exc

    def forget_now(self, key: str) -> int:
        if self._writer is None:
            raise HistoryBackendError("the SQLite history store is closed")
        writer = self._writer
        try:
            with self._write_lock:
                secure = writer.execute("PRAGMA secure_delete").fetchone()[0]
                writer.execute("PRAGMA synchronous=FULL")
                writer.execute("PRAGMA secure_delete=ON")
                try:
                    writer.execute("BEGIN IMMEDIATE")
                    try:
                        removed = writer.execute(
                            "DELETE FROM history_events WHERE user_key = ?", (key,)
                        ).rowcount
                        writer.execute("DELETE FROM history_users WHERE user_key = ?", (key,))
                    except BaseException:
                        writer.execute("ROLLBACK")
                        raise
                    writer.execute("COMMIT")
                finally:
                    restore = {0: "OFF", 1: "ON", 2: "FAST"}.get(int(secure), "OFF")
                    writer.execute(f"PRAGMA secure_delete={restore}")
                    writer.execute("PRAGMA synchronous=NORMAL")
                writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            raise HistoryBackendError(f"{self.path}: {exc}") from exc
        return max(removed, 0)

    def _append_user(self, key: str, events: Sequence[StoredEvent], cutoff: int, keep: int) -> None:
        assert self._writer is not None
        self._writer.executemany(
            "INSERT OR IGNORE INTO history_events (user_key, timestamp, event_type, item_id) "
            "VALUES (?, ?, ?, ?)",
            [(key, e.timestamp, e.event_type, e.item_id) for e in events if e.timestamp >= cutoff],
        )
        self._writer.execute(
            "DELETE FROM history_events WHERE user_key = ? AND (timestamp < ? OR seq NOT IN "
            "(SELECT seq FROM history_events WHERE user_key = ? "
            "ORDER BY timestamp DESC, seq DESC LIMIT ?))",
            (key, cutoff, key, keep),
        )

    def _update_user(self, key: str, sealed_id: str | None) -> None:
        """The user's row after a write: a new version and the newest event's time (the row
        goes when no event is left); the sealed id when one came with the write."""
        assert self._writer is not None
        (newest,) = self._writer.execute(
            "SELECT max(timestamp) FROM history_events WHERE user_key = ?", (key,)
        ).fetchone()
        if newest is None:
            self._writer.execute("DELETE FROM history_users WHERE user_key = ?", (key,))
            return
        self._writer.execute(
            "INSERT INTO history_users (user_key, sealed_id, version, newest) VALUES (?, ?, 1, ?) "
            "ON CONFLICT (user_key) DO UPDATE SET version = version + 1, newest = excluded.newest,"
            " sealed_id = coalesce(excluded.sealed_id, sealed_id)",
            (key, sealed_id, int(newest)),
        )

    def _close_connections(self) -> None:
        for name in ("_reader", "_writer"):
            connection = getattr(self, name)
            if connection is not None:
                connection.close()
                setattr(self, name, None)
