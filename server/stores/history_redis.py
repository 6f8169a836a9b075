"""The shared history backend: Redis, so that every replica sees the same user histories.

Each user is one string key ``ltrec:history:v1:<user key>`` holding a JSON array of
``[timestamp, event type, item id]``, oldest first, that expires `retention` seconds after its
newest event. The users' entries (`server.stores.history.UserEntry`) are two more keys: the hash
``ltrec:history:v1:users`` (user key -> JSON ``[sealed id, version]``) and the sorted set
``ltrec:history:v1:active`` (user key, scored by the newest event's time), which Audience lists
newest first; entries whose newest event left the retention are removed as a listing passes
them. Appending is one Lua script per user (`_APPEND`: read, dedupe, order, bound, prune, write,
set the expiry and update the entry atomically on the server, so that concurrent replicas never
lose each other's events), all users of a FeedbackBatch in one pipelined round trip. A read is
one GET. Forgetting a user is one GET, DEL, HDEL and ZREM in a MULTI/EXEC transaction (what was
there is what was deleted, whatever another replica appends meanwhile). The keys of one store
share no hash slot: a single Redis (or a primary with replicas), not Redis Cluster.

Redis being unreachable must cost serving little: every call has a short timeout and no retry,
and after a failure the backend answers "unavailable" at once for `unavailable_backoff_seconds`
before it tries Redis again (`server.stores.history` counts both as errors and serves without).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import cast
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from server.stores.history import HistoryBackendError, StoredEvent, UserEntry

logger = logging.getLogger(__name__)

KEY_PREFIX = "ltrec:history:v1:"
USERS_KEY = KEY_PREFIX + "users"  # hash: user key -> JSON [sealed id or null, version]
ACTIVE_KEY = KEY_PREFIX + "active"  # sorted set: user key scored by the newest event's time
# Entries past the retention removed per listing (the rest go with the next listings).
PRUNE_PER_LISTING = 1000
MGET_CHUNK = 1000

# KEYS[1]: the user's key, KEYS[2] USERS_KEY, KEYS[3] ACTIVE_KEY. ARGV: new events as a JSON
# array of [timestamp, type, item], the cutoff (now - retention), how many to keep, now, the
# retention, the user key (the entry's member), the sealed id ('' for none: keep the kept one).
# The rules of server.stores.history.merge_events, on the server: old events first, then the
# new ones, each (timestamp, type, item) once, ordered by timestamp then arrival, the newest
# `keep`; then the entry: version + 1, the newest event's time (no event left: no entry).
_APPEND = """
local raw = redis.call('GET', KEYS[1])
local old = {}
if raw then old = cjson.decode(raw) end
local new = cjson.decode(ARGV[1])
local cutoff = tonumber(ARGV[2])
local keep = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local retention = tonumber(ARGV[5])
local seen, merged = {}, {}
local function add(e)
  if e[1] >= cutoff then
    local id = string.format('%d', e[1]) .. '\\0' .. e[2] .. '\\0' .. e[3]
    if not seen[id] then
      seen[id] = true
      merged[#merged + 1] = {e[1], e[2], e[3], #merged}
    end
  end
end
for _, e in ipairs(old) do add(e) end
for _, e in ipairs(new) do add(e) end
table.sort(merged, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[4] < b[4]
end)
local out = {}
for i = math.max(1, #merged - keep + 1), #merged do
  out[#out + 1] = {merged[i][1], merged[i][2], merged[i][3]}
end
local member = ARGV[6]
local ttl = 0
if #out > 0 then ttl = out[#out][1] + retention - now end
if ttl < 1 then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  return 0
end
redis.call('SET', KEYS[1], cjson.encode(out), 'EX', string.format('%d', ttl))
local sealed, version = cjson.null, 0
local entry = redis.call('HGET', KEYS[2], member)
if entry then
  local kept = cjson.decode(entry)
  sealed, version = kept[1], kept[2]
end
if ARGV[7] ~= '' then sealed = ARGV[7] end
redis.call('HSET', KEYS[2], member, cjson.encode({sealed, version + 1}))
redis.call('ZADD', KEYS[3], out[#out][1], member)
return #out
"""


def redis_url(address: str) -> str:
    """``host:port`` or a ``redis://`` / ``rediss://`` (TLS) URL, as a URL."""
    return address if "://" in address else f"redis://{address}"


def check_address(address: str) -> str | None:
    """Why `address` cannot be used (None: it can); a password belongs in its own variable."""
    try:
        parts = urlsplit(redis_url(address))
        port = parts.port
    except ValueError as exc:
        return f"not host:port or a redis:// URL ({exc})"
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        return "host:port or a redis:// or rediss:// URL"
    if parts.password or parts.username:
        return "without credentials (set LTREC_HISTORY_REDIS_PASSWORD)"
    if port is None and "://" not in address:
        return "host:port (the port is missing)"
    return None


class RedisHistory:
    """`HistoryBackend` on a Redis server (`redis.asyncio`); one client, pooled connections."""

    def __init__(
        self,
        address: str,
        *,
        password: str = "",
        timeout_seconds: float = 0.1,
        unavailable_backoff_seconds: float = 1.0,
    ) -> None:
        self.address = address
        self._client = redis.Redis.from_url(
            redis_url(address),
            password=password or None,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),  # a failure is answered at once, then backed off
            decode_responses=False,
        )
        self._append = self._client.register_script(_APPEND)
        self._backoff_seconds = unavailable_backoff_seconds
        self._down_until = 0.0

    def _check_up(self) -> None:
        if time.monotonic() < self._down_until:
            raise HistoryBackendError(
                f"Redis at {self.address} failed less than {self._backoff_seconds:g} s ago"
            )

    def _failed(self, exc: Exception) -> HistoryBackendError:
        if time.monotonic() >= self._down_until:
            logger.warning(
                "history store: Redis at %s failed (%s); not asked for %g s",
                self.address,
                exc,
                self._backoff_seconds,
            )
        self._down_until = time.monotonic() + self._backoff_seconds
        return HistoryBackendError(f"Redis at {self.address}: {type(exc).__name__}: {exc}")

    async def read(self, key: str, since: int, limit: int) -> list[StoredEvent]:
        self._check_up()
        try:
            raw = await self._client.get(KEY_PREFIX + key)
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        if raw is None:
            return []
        return _events(raw, since)[-limit:]

    async def read_many(
        self, keys: Sequence[str], since: int, limit: int
    ) -> dict[str, list[StoredEvent]]:
        self._check_up()
        unique = list(dict.fromkeys(keys))
        out: dict[str, list[StoredEvent]] = {}
        for start in range(0, len(unique), MGET_CHUNK):
            chunk = unique[start : start + MGET_CHUNK]
            try:
                raws = cast(
                    list[bytes | None], await self._client.mget([KEY_PREFIX + key for key in chunk])
                )
            except (RedisError, OSError) as exc:
                raise self._failed(exc) from exc
            for key, raw in zip(chunk, raws, strict=True):
                out[key] = [] if raw is None else _events(raw, since)[-limit:]
        return out

    async def users(self, since: int, limit: int) -> list[UserEntry]:
        self._check_up()
        try:
            listed = cast(
                list[tuple[bytes, float]],
                await self._client.zrevrangebyscore(
                    ACTIVE_KEY, "+inf", since, start=0, num=limit, withscores=True
                ),
            )
            entries = cast(
                list[bytes | None],
                await self._client.hmget(USERS_KEY, [m for m, _ in listed]) if listed else [],
            )
            expired = cast(
                list[bytes],
                await self._client.zrangebyscore(
                    ACTIVE_KEY, "-inf", f"({since}", start=0, num=PRUNE_PER_LISTING
                ),
            )
            if expired:
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.zrem(ACTIVE_KEY, *expired)
                    pipe.hdel(USERS_KEY, *expired)
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        users = []
        for (member, newest), raw in zip(listed, entries, strict=True):
            if raw is None:  # forgotten between the two calls
                continue
            try:
                sealed, version = json.loads(raw)
            except (ValueError, TypeError):
                continue
            users.append(
                UserEntry(
                    member.decode("ascii", "replace"),
                    sealed if isinstance(sealed, str) else None,
                    int(version),
                    int(newest),
                )
            )
        return users

    async def append(
        self,
        events: Mapping[str, Sequence[StoredEvent]],
        now: int,
        keep: int,
        retention: int,
        sealed_ids: Mapping[str, str] | None = None,
    ) -> None:
        self._check_up()
        sealed = sealed_ids or {}
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, user_events in events.items():
                    rows = [[e.timestamp, e.event_type, e.item_id] for e in user_events]
                    await self._append(
                        keys=[KEY_PREFIX + key, USERS_KEY, ACTIVE_KEY],
                        args=[
                            json.dumps(rows),
                            now - retention,
                            keep,
                            now,
                            retention,
                            key,
                            sealed.get(key, ""),
                        ],
                        client=pipe,
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc

    async def forget(self, key: str) -> int:
        self._check_up()
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.get(KEY_PREFIX + key)
                pipe.delete(KEY_PREFIX + key)
                pipe.hdel(USERS_KEY, key)
                pipe.zrem(ACTIVE_KEY, key)
                raw, *_ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        if raw is None:
            return 0
        try:
            rows = json.loads(raw)
        except ValueError:
            return 0  # not a history, and deleted all the same
        return len(rows) if isinstance(rows, list) else 0

    async def close(self) -> None:
        await self._client.aclose()


def _events(raw: bytes | str, since: int) -> list[StoredEvent]:
    """A stored JSON history's events at or after `since`, oldest first."""
    try:
        rows = json.loads(raw)
        events = [StoredEvent(int(t), str(e), str(i)) for t, e, i in rows]
    except (ValueError, TypeError) as exc:
        raise HistoryBackendError(f"{KEY_PREFIX}<user>: not a history ({exc})") from exc
    return [e for e in events if e.timestamp >= since]
