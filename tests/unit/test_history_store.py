"""The history store's backends: SQLite (one file, WAL) and Redis (a real redis-server), held to
the same rules (`server.stores.history`): bounded per user, deduplicated, ordered by time then
arrival, pruned after the retention; SQLite survives a reopen and takes two writers at once."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY

from server.config import ConfigError, GatewayConfig
from server.errors import BackendUnavailable
from server.hashing import open_user_id, seal_user_id, user_hash, user_key
from server.stores.history import (
    HistoryBackend,
    HistoryBackendError,
    HistoryStore,
    KnownUser,
    StoredEvent,
    merge_events,
)
from server.stores.history_redis import ACTIVE_KEY, KEY_PREFIX, USERS_KEY, RedisHistory
from server.stores.history_sqlite import SqliteHistory
from tests.support.gateway import run_async
from triton_local.redis_server import RedisServer
from triton_local.server import free_ports

NOW = 1_700_000_000
DAY = 24 * 3600
BACKENDS = ("sqlite", "redis")


def view(t: int, item: str) -> StoredEvent:
    return StoredEvent(t, "view", item)


@pytest.fixture(params=BACKENDS)
def backend_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], HistoryBackend]:
    """Makes backend objects over one shared place (a file, or one redis-server)."""
    if request.param == "sqlite":

        def sqlite() -> HistoryBackend:
            backend = SqliteHistory(tmp_path / "history.sqlite3")
            backend.open()
            return backend

        return sqlite
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda: RedisHistory(server.address, timeout_seconds=2.0)


@asynccontextmanager
async def opened(factory: Callable[[], HistoryBackend]) -> AsyncIterator[HistoryBackend]:
    backend = factory()
    try:
        yield backend
    finally:
        await backend.close()


@run_async
async def test_each_user_keeps_only_the_newest_max_events(
    backend_factory: Callable[[], HistoryBackend],
) -> None:
    async with opened(backend_factory) as backend:
        events = [view(NOW - 100 + n, f"i{n}") for n in range(5)]
        await backend.append({"alice": events[:2]}, NOW, 3, DAY)
        await backend.append({"alice": events[2:], "bob": [view(NOW, "b1")]}, NOW, 3, DAY)
        assert await backend.read("alice", NOW - DAY, 3) == events[2:]
        # The bound is kept on write, not only on read: a larger read finds no more.
        assert await backend.read("alice", NOW - DAY, 100) == events[2:]
        assert await backend.read("bob", NOW - DAY, 3) == [view(NOW, "b1")]
        assert await backend.read("carol", NOW - DAY, 3) == []


@run_async
async def test_order_is_by_time_then_arrival_and_repeats_are_kept_once(
    backend_factory: Callable[[], HistoryBackend],
) -> None:
    async with opened(backend_factory) as backend:
        cart = StoredEvent(NOW - 5, "cart", "i9")
        first = [view(NOW - 5, "z-first"), view(NOW - 10, "older"), cart]
        await backend.append({"u": first}, NOW, 10, DAY)
        # Re-sent (a retried Feedback, a remembered history sent again) plus one new event that
        # ties with the others: it goes after them (arrival), repeats are not kept twice.
        await backend.append({"u": [*first, view(NOW - 5, "a-later")]}, NOW, 10, DAY)
        assert await backend.read("u", NOW - DAY, 10) == [
            view(NOW - 10, "older"),
            view(NOW - 5, "z-first"),
            cart,
            view(NOW - 5, "a-later"),
        ]
        # The same item at another time, or as another type, is another event.
        await backend.append(
            {"u": [view(NOW - 1, "older"), StoredEvent(NOW, "cart", "older")]}, NOW, 10, DAY
        )
        assert len(await backend.read("u", NOW - DAY, 10)) == 6


@run_async
async def test_events_older_than_the_retention_are_neither_kept_nor_returned(
    backend_factory: Callable[[], HistoryBackend],
) -> None:
    async with opened(backend_factory) as backend:
        retention = 1000
        old, recent = view(NOW - 900, "old"), view(NOW - 10, "recent")
        await backend.append({"u": [view(NOW - 5000, "expired"), old, recent]}, NOW, 10, retention)
        assert await backend.read("u", NOW - retention, 10) == [old, recent]
        # A shorter window reads fewer (a request's stored_history_max_age_seconds).
        assert await backend.read("u", NOW - 100, 10) == [recent]
        # 500 s later `old` is past the retention: the next write prunes it.
        later = NOW + 500
        await backend.append({"u": [view(later, "new")]}, later, 10, retention)
        assert await backend.read("u", 0, 10) == [recent, view(later, "new")]


@run_async
async def test_sqlite_history_survives_a_reopen_and_keeps_its_hash_key(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    first = SqliteHistory(path)
    first.open()
    key = first.hash_key()
    await first.append({"u": [view(NOW, "i1"), view(NOW + 1, "i2")]}, NOW, 10, DAY)
    await first.close()

    again = SqliteHistory(path)
    again.open()
    try:
        assert again.hash_key() == key and len(key) == 64
        assert await again.read("u", NOW - DAY, 10) == [view(NOW, "i1"), view(NOW + 1, "i2")]
        (mode,) = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()
        assert mode == "wal"
    finally:
        await again.close()


def test_two_sqlite_stores_on_one_file_write_concurrently(tmp_path: Path) -> None:
    """Two gateway processes on one machine: writers take turns, nothing is lost or locked."""
    path = tmp_path / "history.sqlite3"
    stores = [SqliteHistory(path, busy_timeout_seconds=10.0) for _ in range(2)]
    for store in stores:
        store.open()
    errors: list[BaseException] = []
    per_writer = 150

    def write(writer: int) -> None:
        try:
            for n in range(per_writer):
                shared = view(NOW + n, f"w{writer}-{n}")
                own = view(NOW + n, f"item-{n}")
                stores[writer].append_now(
                    {"shared": [shared], f"own-{writer}": [own]}, NOW, 1000, DAY
                )
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    shared = stores[0].read_now("shared", 0, 1000)
    assert len(shared) == 2 * per_writer
    assert [e.timestamp for e in shared] == sorted(e.timestamp for e in shared)
    for writer in range(2):
        mine = [e.item_id for e in shared if e.item_id.startswith(f"w{writer}-")]
        assert mine == [f"w{writer}-{n}" for n in range(per_writer)]  # each writer's order kept
        assert len(stores[1 - writer].read_now(f"own-{writer}", 0, 1000)) == per_writer
    for store in stores:
        asyncio.run(store.close())


@run_async
async def test_backends_follow_the_one_merge_rule(
    backend_factory: Callable[[], HistoryBackend],
) -> None:
    """Random appends (repeats, ties, out-of-order and expired events) give exactly what
    `merge_events` gives, in both backends."""
    rng = random.Random(7)
    keep, retention = 6, 500
    expected: list[StoredEvent] = []
    async with opened(backend_factory) as backend:
        now = NOW
        for _ in range(40):
            now += rng.randrange(0, 60)
            batch = [
                StoredEvent(
                    now - rng.randrange(0, 700),
                    rng.choice(("view", "cart")),
                    f"i{rng.randrange(5)}",
                )
                for _ in range(rng.randrange(1, 4))
            ]
            await backend.append({"u": batch}, now, keep, retention)
            expected = merge_events(expected, batch, now - retention, keep)
            assert await backend.read("u", now - retention, keep) == expected


@run_async
async def test_forget_deletes_one_users_events_for_every_reader(
    backend_factory: Callable[[], HistoryBackend],
) -> None:
    async with opened(backend_factory) as writer, opened(backend_factory) as other:
        alice = [view(NOW - 2, "a1"), view(NOW - 1, "a2")]
        await writer.append({"alice": alice, "bob": [view(NOW, "b1")]}, NOW, 10, DAY)
        assert await other.read("alice", NOW - DAY, 10) == alice
        assert await other.forget("alice") == 2
        # At once, for the other connection (replica) too; bob is untouched.
        assert await writer.read("alice", NOW - DAY, 10) == []
        assert await writer.read("bob", NOW - DAY, 10) == [view(NOW, "b1")]
        assert await writer.forget("alice") == 0
        assert await writer.forget("nobody") == 0
        # A user who comes back starts afresh.
        await writer.append({"alice": [view(NOW, "a3")]}, NOW, 10, DAY)
        assert await other.read("alice", NOW - DAY, 10) == [view(NOW, "a3")]


@run_async
async def test_sqlite_forget_leaves_no_trace_in_the_files(tmp_path: Path) -> None:
    """Deleted with secure_delete and checkpointed: neither the events nor the user's key are
    left in the database file, its WAL or free pages, while the store is still open (closing
    it would checkpoint anyway)."""
    backend = SqliteHistory(tmp_path / "h.sqlite3")
    backend.open()
    try:
        events = [view(NOW - n, f"alices-item-{n}") for n in range(50)]
        users = {"alice-key": events, "bob-key": [view(NOW, "bobs-item")]}
        await backend.append(users, NOW, 50, DAY)
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("h.sqlite3*"))
        assert b"alices-item" in raw and b"alice-key" in raw
        assert await backend.forget("alice-key") == 50
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("h.sqlite3*"))
    finally:
        await backend.close()
    assert b"bobs-item" in raw and b"bob-key" in raw
    assert b"alices-item" not in raw and b"alice-key" not in raw


@run_async
async def test_forget_fails_loudly_counted(tmp_path: Path) -> None:
    """Unlike reads and writes, a failed forget is raised (ForgetUser answers UNAVAILABLE)."""
    (port,) = free_ports(1)  # nothing listens there
    backend = RedisHistory(f"127.0.0.1:{port}", timeout_seconds=0.5)
    store = HistoryStore(backend, b"k", max_events=3, retention_seconds=DAY, name="redis")
    errors = "ltrec_gateway_history_store_errors_total"
    failed = sample(errors, {"op": "forget"})
    with pytest.raises(BackendUnavailable, match=r"history store \(redis\) cannot delete"):
        await store.forget("u")
    assert sample(errors, {"op": "forget"}) == failed + 1
    await store.close()


@run_async
async def test_the_store_keys_users_by_a_keyed_hash_never_the_id(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    user = "alice@example.com"
    key = b"secret"
    sqlite = SqliteHistory(tmp_path / "h.sqlite3")
    sqlite.open()
    backends: list[HistoryBackend] = [sqlite, RedisHistory(redis_server.address)]
    for backend in backends:
        store = HistoryStore(backend, key, max_events=3, retention_seconds=DAY, name="test")
        assert await store.remember([(user, view(NOW, "i1"))], NOW) == 1
        assert await store.recent(user, NOW) == [view(NOW, "i1")]
        assert await store.recent("bob", NOW) == []
        await store.close()
    assert user_key(user, key).startswith(user_hash(user, key))  # a log line's user is a prefix
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("h.sqlite3*"))
    assert user_key(user, key).encode() in raw and b"alice" not in raw
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    history = f"{KEY_PREFIX}{user_key(user, key)}".encode()
    assert sorted(client.keys("*")) == sorted([history, ACTIVE_KEY.encode(), USERS_KEY.encode()])
    assert b"alice" not in client.get(history)
    # the user's entry: the sealed id (no id in clear) and the newest event's time
    entry = client.hget(USERS_KEY, user_key(user, key))
    assert entry is not None and b"alice" not in entry
    assert client.zscore(ACTIVE_KEY, user_key(user, key)) == NOW
    ttl = client.ttl(history)
    assert DAY - 5 <= ttl <= DAY  # expires a retention after its newest event
    client.close()


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@run_async
async def test_unreachable_redis_reads_nothing_and_drops_writes_counted_and_fast() -> None:
    (port,) = free_ports(1)  # nothing listens there
    backend = RedisHistory(f"127.0.0.1:{port}", timeout_seconds=0.5, unavailable_backoff_seconds=30)
    store = HistoryStore(backend, b"k", max_events=3, retention_seconds=DAY, name="redis")
    errors = "ltrec_gateway_history_store_errors_total"
    reads, writes = sample(errors, {"op": "read"}), sample(errors, {"op": "write"})
    assert await store.recent("u", NOW) == []
    assert await store.remember([("u", view(NOW, "i1"))], NOW) == 0
    assert sample(errors, {"op": "read"}) == reads + 1
    assert sample(errors, {"op": "write"}) == writes + 1
    # Backing off: the next calls do not wait on Redis at all.
    started = time.perf_counter()
    for _ in range(20):
        assert await store.recent("u", NOW) == []
    assert time.perf_counter() - started < 0.05
    with pytest.raises(HistoryBackendError, match="failed less than 30 s ago"):
        await backend.read("u", 0, 3)
    assert sample(errors, {"op": "read"}) == reads + 21
    await store.close()


@run_async
async def test_redis_with_a_password(tmp_path: Path) -> None:
    with RedisServer(password="s3cret", log_path=tmp_path / "redis.log") as server:
        wrong = HistoryStore(
            RedisHistory(server.address, password="nope"), b"k", max_events=3,
            retention_seconds=DAY, name="redis",
        )  # fmt: skip
        assert await wrong.remember([("u", view(NOW, "i1"))], NOW) == 0
        await wrong.close()
        right = HistoryStore(
            RedisHistory(server.address, password="s3cret"), b"k", max_events=3,
            retention_seconds=DAY, name="redis",
        )  # fmt: skip
        assert await right.remember([("u", view(NOW, "i1"))], NOW) == 1
        assert await right.recent("u", NOW) == [view(NOW, "i1")]
        await right.close()


CONFIG_ERRORS = {
    "unknown store": ({"LTREC_HISTORY_STORE": "memcached"}, "LTREC_HISTORY_STORE must be one of"),
    "retention too short": (
        {"LTREC_HISTORY_RETENTION_SECONDS": "59"},
        "LTREC_HISTORY_RETENTION_SECONDS must be in [60, 31536000]",
    ),
    "retention too long": (
        {"LTREC_HISTORY_RETENTION_SECONDS": str(366 * DAY)},
        "LTREC_HISTORY_RETENTION_SECONDS must be in [60, 31536000]",
    ),
    "redis without address": (
        {"LTREC_HISTORY_STORE": "redis", "LTREC_USER_HASH_KEY": "k"},
        "LTREC_HISTORY_REDIS_ADDRESS must be set",
    ),
    "redis without hash key": (
        {"LTREC_HISTORY_STORE": "redis", "LTREC_HISTORY_REDIS_ADDRESS": "redis:6379"},
        "LTREC_USER_HASH_KEY must be set with LTREC_HISTORY_STORE=redis",
    ),
    "password in the address": (
        {
            "LTREC_HISTORY_STORE": "redis",
            "LTREC_HISTORY_REDIS_ADDRESS": "redis://:hunter2@redis:6379",
            "LTREC_USER_HASH_KEY": "k",
        },
        "LTREC_HISTORY_REDIS_ADDRESS must be without credentials",
    ),
    "address without port": (
        {
            "LTREC_HISTORY_STORE": "redis",
            "LTREC_HISTORY_REDIS_ADDRESS": "redis",
            "LTREC_USER_HASH_KEY": "k",
        },
        "LTREC_HISTORY_REDIS_ADDRESS must be host:port",
    ),
    "address but sqlite": (
        {"LTREC_HISTORY_REDIS_ADDRESS": "redis:6379"},
        "LTREC_HISTORY_REDIS_ADDRESS must be empty unless LTREC_HISTORY_STORE=redis",
    ),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_history_configuration_errors_name_the_variable(case: tuple[dict[str, str], str]) -> None:
    env, message = case
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as caught:
        GatewayConfig.from_env({"LTREC_ALLOW_PLAINTEXT": "true", **env})
    assert "hunter2" not in str(caught.value)


def test_history_configuration_of_redis_keeps_the_password_out_of_repr() -> None:
    config = GatewayConfig.from_env(
        {
            "LTREC_ALLOW_PLAINTEXT": "true",
            "LTREC_HISTORY_STORE": "Redis",
            "LTREC_HISTORY_REDIS_ADDRESS": "redis.recsys:6379",
            "LTREC_HISTORY_REDIS_PASSWORD": "hunter2",
            "LTREC_USER_HASH_KEY": "key-material",
            "LTREC_HISTORY_RETENTION_SECONDS": "3600",
        }
    )
    assert (config.history_store, config.history_redis_password) == ("redis", "hunter2")
    assert config.history_retention_seconds == 3600
    assert "hunter2" not in repr(config) and "key-material" not in repr(config)


def test_the_local_stack_keeps_one_hash_key_beside_its_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m triton_local.stack --history-redis`: users keep their history over restarts."""
    from triton_local.stack import redis_env

    monkeypatch.delenv("LTREC_USER_HASH_KEY", raising=False)
    server = RedisServer(port=6390)  # not started: only its address is used
    first, second = redis_env(server, tmp_path), redis_env(server, tmp_path)
    assert first == second
    assert first["LTREC_HISTORY_REDIS_ADDRESS"] == "127.0.0.1:6390"
    assert (tmp_path / "user_hash_key").stat().st_mode & 0o777 == 0o600
    config = GatewayConfig.from_env({"LTREC_ALLOW_PLAINTEXT": "true", **first})
    assert config.history_store == "redis" and len(config.user_hash_key) == 64
    monkeypatch.setenv("LTREC_USER_HASH_KEY", "given")
    assert redis_env(server, tmp_path)["LTREC_USER_HASH_KEY"] == "given"


def test_the_local_stack_takes_a_redis_of_ones_own_from_the_gateways_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`LTREC_HISTORY_STORE=redis LTREC_HISTORY_REDIS_ADDRESS=... make serve`: the gateway's own
    variables reach it, and the serving line names the store; `--history-redis` (a redis-server
    of the stack's own) beside such an address is refused before anything starts."""
    from triton_local.stack import describe_history, main

    sqlite = tmp_path / "history.sqlite3"
    redis_vars = {"LTREC_HISTORY_STORE": "redis", "LTREC_HISTORY_REDIS_ADDRESS": "cache:6379"}
    assert describe_history(redis_vars, sqlite) == "history store Redis at cache:6379"
    assert describe_history({}, sqlite) == f"history store SQLite {sqlite}"
    assert describe_history({"LTREC_HISTORY_STORE": "off"}, sqlite) == "history store off"

    monkeypatch.setenv("LTREC_HISTORY_REDIS_ADDRESS", "cache:6379")
    with caplog.at_level(logging.ERROR, logger="triton_local.stack"):
        code = main(["--model-repository", str(tmp_path), "--history-redis", str(tmp_path)])
    assert code == 2
    assert "LTREC_HISTORY_REDIS_ADDRESS points the gateway at another" in caplog.text


# --- The users' entries (Audience) ---------------------------------------------------------------


@run_async
async def test_users_are_listed_most_recent_first_with_their_ids_and_a_version_per_write(
    backend_factory: Callable[[], HistoryBackend],
) -> None:
    """Audience lists the users of the store: newest event first, within the retention, at most
    the limit, each with the caller's id and a version that changes with every write."""
    async with opened(backend_factory) as backend:
        store = HistoryStore(backend, b"k", max_events=3, retention_seconds=DAY, name="t")
        await store.remember([("carol", view(NOW - 2 * DAY, "old"))], NOW - 2 * DAY)
        await store.remember([("alice", view(NOW - 50, "a1")), ("bob", view(NOW - 10, "b1"))], NOW)
        listed = await store.known_users(NOW, 10)
        assert [u.user_id for u in listed] == ["bob", "alice"]  # carol is past the retention
        assert [u.key for u in listed] == [user_key("bob", b"k"), user_key("alice", b"k")]
        assert [u.user_id for u in await store.known_users(NOW, 1)] == ["bob"]
        before = {u.user_id: u.version for u in listed}
        # A write to alice (even a repeated event) changes her version, not bob's; she is now
        # the most recent.
        await store.remember([("alice", view(NOW - 5, "a2"))], NOW)
        after = await store.known_users(NOW, 10)
        assert [u.user_id for u in after] == ["alice", "bob"]
        versions = {u.user_id: u.version for u in after}
        assert versions["alice"] != before["alice"] and versions["bob"] == before["bob"]
        # Their histories, as recent() reads one user's.
        keys = [u.key for u in after]
        histories = await store.histories([*keys, user_key("nobody", b"k")], NOW)
        assert histories[keys[0]] == [view(NOW - 50, "a1"), view(NOW - 5, "a2")]
        assert histories[keys[1]] == [view(NOW - 10, "b1")]
        assert histories[user_key("nobody", b"k")] == []
        # Forgetting a user takes them off the list at once.
        assert await store.forget("alice") == 2
        assert [u.user_id for u in await store.known_users(NOW, 10)] == ["bob"]


@run_async
async def test_a_user_under_another_hash_key_is_listed_without_an_id(
    backend_factory: Callable[[], HistoryBackend],
) -> None:
    """An id sealed under another key cannot be opened: listed (the events are there) with no
    id, never with someone else's."""
    async with opened(backend_factory) as backend:
        old = HistoryStore(backend, b"old-key", max_events=3, retention_seconds=DAY, name="t")
        await old.remember([("alice", view(NOW, "a1"))], NOW)
        new = HistoryStore(backend, b"new-key", max_events=3, retention_seconds=DAY, name="t")
        (listed,) = await new.known_users(NOW, 10)
        assert listed == KnownUser(user_key("alice", b"old-key"), None, listed.version)


def test_a_version_1_sqlite_file_is_migrated_and_its_users_get_their_ids_with_the_next_event(
    tmp_path: Path,
) -> None:
    path = tmp_path / "h.sqlite3"
    connection = sqlite3.connect(path)
    connection.executescript(
        "CREATE TABLE history_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_key TEXT NOT "
        "NULL, timestamp INTEGER NOT NULL, event_type TEXT NOT NULL, item_id TEXT NOT NULL, "
        "UNIQUE (user_key, timestamp, event_type, item_id));"
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "PRAGMA user_version = 1;"
    )
    connection.execute(
        "INSERT INTO history_events (user_key, timestamp, event_type, item_id) VALUES (?, ?, ?, ?)",
        (user_key("alice", b"k"), NOW - 20, "view", "a1"),
    )
    connection.commit()
    connection.close()

    async def check() -> None:
        backend = SqliteHistory(path)
        backend.open()
        store = HistoryStore(backend, b"k", max_events=3, retention_seconds=DAY, name="t")
        (listed,) = await store.known_users(NOW, 10)
        assert listed.key == user_key("alice", b"k") and listed.user_id is None
        await store.remember([("alice", view(NOW - 10, "a2"))], NOW)
        (listed,) = await store.known_users(NOW, 10)
        assert listed.user_id == "alice"
        assert await store.recent("alice", NOW) == [view(NOW - 20, "a1"), view(NOW - 10, "a2")]
        await store.close()

    asyncio.run(check())
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 2
    connection.close()


@run_async
async def test_listing_users_fails_loudly_counted(tmp_path: Path) -> None:
    """Unlike a Recommend's read, an audience cannot be answered without its users."""
    (port,) = free_ports(1)
    backend = RedisHistory(f"127.0.0.1:{port}", timeout_seconds=0.5, unavailable_backoff_seconds=30)
    store = HistoryStore(backend, b"k", max_events=3, retention_seconds=DAY, name="redis")
    errors = "ltrec_gateway_history_store_errors_total"
    before = sample(errors, {"op": "users"})
    with pytest.raises(BackendUnavailable, match=r"history store \(redis\) cannot list"):
        await store.known_users(NOW, 10)
    with pytest.raises(BackendUnavailable, match=r"cannot read its users"):
        await store.histories(["k1"], NOW)
    assert sample(errors, {"op": "users"}) == before + 2
    await store.close()


@pytest.mark.parametrize("user", ["alice@example.com", "ü" * 256, "1m_42", "a\ud800b"])
def test_a_sealed_id_opens_only_for_its_own_row_and_key(user: str) -> None:
    key = b"hash-key"
    sealed = seal_user_id(user, key)
    assert sealed.startswith("s1:") and user not in sealed
    assert seal_user_id(user, key) == sealed  # deterministic, as the store key is
    assert open_user_id(sealed, user_key(user, key), key) == user
    assert open_user_id(sealed, user_key(user, b"other-key"), b"other-key") is None
    assert open_user_id(sealed, user_key("mallory", key), key) is None  # another row's id
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    assert open_user_id(tampered, user_key(user, key), key) is None
    assert open_user_id("not sealed", user_key(user, key), key) is None
    assert open_user_id("s1:!!", user_key(user, key), key) is None
