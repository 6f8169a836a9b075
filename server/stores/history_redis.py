"""The shared history backend: Redis, so that every replica sees the same user histories.

Each user is one string key ``ltrec:history:v1:<user key>`` holding a JSON array of
``[timestamp, event type, item id]``, oldest first, that expires `retention` seconds after its
newest event. Appending is one Lua script per user (`_APPEND`: read, dedupe, order, bound, prune,
write and set the expiry atomically on the server, so that concurrent replicas never lose each
other's events), all users of a FeedbackBatch in one pipelined round trip. A read is one GET.
Forgetting a user is one GET and DEL in a MULTI/EXEC transaction (what was there is what was
deleted, whatever another replica appends meanwhile).

Redis being unreachable must cost serving little: every call has a short timeout and no retry,
and after a failure the backend answers "unavailable" at once for `unavailable_backoff_seconds`
before it tries Redis again (`server.stores.history` counts both as errors and serves without).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from server.stores.history import HistoryBackendError, StoredEvent

logger = logging.getLogger(__name__)

KEY_PREFIX = "ltrec:history:v1:"

# KEYS[1]: the user's key. ARGV: new events as a JSON array of [timestamp, type, item], the
# cutoff (now - retention), how many to keep, now, the retention. The rules of
# server.stores.history.merge_events, on the server: old events first, then the new ones, each
# (timestamp, type, item) once, ordered by timestamp then arrival, the newest `keep`.
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
if #out == 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
local ttl = out[#out][1] + retention - now
if ttl < 1 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], cjson.encode(out), 'EX', string.format('%d', ttl))
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
        try:
            rows = json.loads(raw)
            events = [StoredEvent(int(t), str(e), str(i)) for t, e, i in rows]
        except (ValueError, TypeError) as exc:
            raise HistoryBackendError(f"{KEY_PREFIX}<user>: not a history ({exc})") from exc
        return [e for e in events if e.timestamp >= since][-limit:]

    async def append(
        self, events: Mapping[str, Sequence[StoredEvent]], now: int, keep: int, retention: int
    ) -> None:
        self._check_up()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, user_events in events.items():
                    rows = [[e.timestamp, e.event_type, e.item_id] for e in user_events]
                    await self._append(
                        keys=[KEY_PREFIX + key],
                        args=[json.dumps(rows), now - retention, keep, now, retention],
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
                raw, _ = await pipe.execute()
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
