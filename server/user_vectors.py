"""The users of the history store as user vectors: who Audience and ForecastDemand score.

A listing of the store (`HistoryStore.known_users`: the most recently active users first, at
most the request's max users) says who; each user's vector is what Triton's user encoder (the
first step of Recommend) makes of their stored history, as a Recommend with only their user id
reads it. Encoding is batched, and a vector is cached per user and used again while it is
still what the encoder would give:

* the user's entry keeps its version (every write to their events changes it: a new click,
  ForgetUser, another replica's write);
* none of the events it read has left the retention (`expires_at`);
* the catalogue rows it read are the same: after any catalogue change (UpsertItems,
  DeleteItems, another replica's), a user is re-encoded when their history holds an added item
  whose vector changed or that is gone, a trained item now hidden (deleted, or replaced by an
  added item of the same id), or an id the catalogue did not know (it may know it now).

A user whose id cannot be opened (kept before ids were, or under another hash key) is not
scored, nor is one whose stored history holds no item of the catalogue (their vector would be
the empty history's); both are counted. The cache holds at most `max_cached` users (the least
recently used leave first); a listing that covers the whole store drops the users it no longer
holds (forgotten, expired), and `forget` drops one at once (ForgetUser on this replica). The
listing is read for every request, so a user erased on any replica is never scored again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ltrec_core import contract
from server import metrics
from server.catalogue import Catalogue
from server.features import overlay_subset
from server.stores.history import HistoryStore, KnownUser, StoredEvent
from server.triton_client import TritonClient

# Users per user encoder call; a batch is padded to its longest history, and batches are made
# of users of similar history lengths.
ENCODE_BATCH = 128
_EVENT_TYPE_INDEX = {name: 1 + i for i, name in enumerate(contract.EVENT_TYPES)}
_VIEW = _EVENT_TYPE_INDEX["view"]


@dataclass(frozen=True)
class UserMatrix:
    """The users scored by one request, in listing order."""

    user_ids: list[str]
    vectors: npt.NDArray[np.float32]  # [U, D], the user encoder's
    activity: npt.NDArray[np.float32]  # [U]: events of each user the model read (>= 1)
    encoded: int = 0  # of those, vectors computed for this request (the rest were cached)
    without_id: int = 0  # listed users left out: no id to answer with
    without_items: int = 0  # listed users left out: no catalogue item in their history

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass
class _Entry:
    version: int
    vector: npt.NDArray[np.float32] | None  # None: no catalogue item in the history
    events: int  # known events the encoder read
    expires_at: int  # the oldest event read leaves the retention then
    generation: int  # the catalogue generation it was last checked against
    trained: npt.NDArray[np.int64]  # trained catalogue indices it read
    overlay: tuple[tuple[str, bytes], ...] = ()  # added items it read: (id, vector digest)
    unknown: bool = False  # its history held ids the catalogue did not know


@dataclass(frozen=True)
class _History:
    items: list[int]
    event_types: list[int]
    entry: _Entry


class UserVectors:
    def __init__(
        self,
        store: HistoryStore,
        triton: TritonClient,
        *,
        max_history: int,
        embedding_dim: int,
        max_cached: int,
    ) -> None:
        self._store = store
        self._triton = triton
        self._max_history = max_history
        self._dim = embedding_dim
        self._max_cached = max_cached
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._catalogue: Catalogue | None = None
        self._generation = 0
        self._lock = asyncio.Lock()  # one refresh at a time: no user is encoded twice
        # Users forgotten while a refresh runs: left out of its answer, not cached again.
        self._forgotten: set[str] = set()

    def forget(self, user_id: str) -> None:
        """Drops a user's cached vector (ForgetUser on this replica), also from a request being
        answered now."""
        key = self._store.key_of(user_id)
        self._cache.pop(key, None)
        if self._lock.locked():
            self._forgotten.add(key)
        metrics.AUDIENCE_CACHED_USERS.set(len(self._cache))

    async def matrix(
        self,
        max_users: int,
        catalogue: Catalogue,
        now: float,
        *,
        deadline: float | None,
        request_id: str,
    ) -> UserMatrix:
        """The vectors of the most recently active `max_users` users with an id; raises
        BackendUnavailable (store or Triton), BackendTimeout (the deadline)."""
        listed = await self._store.known_users(now, max_users)
        async with self._lock:
            self._check_catalogue(catalogue)
            with_id = [user for user in listed if user.user_id is not None]
            stale = [user for user in with_id if not self._fresh(user, now)]
            try:
                if stale:
                    await self._encode(stale, catalogue, now, deadline, request_id)
            finally:  # encoded or not, a user forgotten meanwhile is not kept
                for key in self._forgotten:
                    self._cache.pop(key, None)
                self._forgotten.clear()
            if len(listed) < max_users:  # the whole store: drop who it no longer holds
                keep = {user.key for user in listed}
                for key in [key for key in self._cache if key not in keep]:
                    del self._cache[key]
            user_ids: list[str] = []
            vectors: list[npt.NDArray[np.float32]] = []
            activity: list[int] = []
            without_items = 0
            for user in with_id:
                entry = self._cache.get(user.key)
                if entry is None:  # forgotten meanwhile
                    continue
                self._cache.move_to_end(user.key)
                if entry.vector is None:
                    without_items += 1
                    continue
                assert user.user_id is not None
                user_ids.append(user.user_id)
                vectors.append(entry.vector)
                activity.append(entry.events)
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
            metrics.AUDIENCE_CACHED_USERS.set(len(self._cache))
        without_id = len(listed) - len(with_id)
        metrics.AUDIENCE_USER_VECTORS_TOTAL.labels(source="cache").inc(len(with_id) - len(stale))
        metrics.AUDIENCE_USER_VECTORS_TOTAL.labels(source="encoded").inc(len(stale))
        metrics.AUDIENCE_SKIPPED_USERS_TOTAL.labels(reason="no_id").inc(without_id)
        metrics.AUDIENCE_SKIPPED_USERS_TOTAL.labels(reason="no_known_items").inc(without_items)
        return UserMatrix(
            user_ids=user_ids,
            vectors=np.stack(vectors).astype(np.float32)
            if vectors
            else np.zeros((0, self._dim), np.float32),
            activity=np.asarray(activity, dtype=np.float32),
            encoded=len(stale),
            without_id=without_id,
            without_items=without_items,
        )

    def _fresh(self, user: KnownUser, now: float) -> bool:
        entry = self._cache.get(user.key)
        return (
            entry is not None
            and entry.version == user.version
            and entry.generation == self._generation
            and entry.expires_at > now
        )

    def _check_catalogue(self, catalogue: Catalogue) -> None:
        """A new catalogue snapshot: keep the entries whose history reads the same rows."""
        if catalogue is self._catalogue:
            return
        self._catalogue = catalogue
        self._generation += 1
        for entry in self._cache.values():
            if _still_valid(entry, catalogue):
                entry.generation = self._generation

    async def _encode(
        self,
        users: Sequence[KnownUser],
        catalogue: Catalogue,
        now: float,
        deadline: float | None,
        request_id: str,
    ) -> None:
        """Reads and encodes `users`; each batch is cached as soon as it is encoded, so a
        request that runs out of time leaves the work done for the next one."""
        stored = await self._store.histories([user.key for user in users], now)
        retention = self._store.retention_seconds
        histories: dict[str, _History] = {}
        for user in users:
            history = self._history(stored.get(user.key, []), catalogue, user.version, retention)
            if not history.items:
                self._cache[user.key] = history.entry  # nothing to encode
            else:
                histories[user.key] = history
        order = sorted(histories, key=lambda key: len(histories[key].items))
        for start in range(0, len(order), ENCODE_BATCH):
            keys = order[start : start + ENCODE_BATCH]
            width = max(len(histories[key].items) for key in keys)
            items = np.zeros((len(keys), width), dtype=np.int64)
            types = np.zeros_like(items)
            for row, key in enumerate(keys):  # left-padded, as the served encoder reads them
                history = histories[key]
                items[row, width - len(history.items) :] = history.items
                types[row, width - len(history.event_types) :] = history.event_types
            items, extra = overlay_subset(items, catalogue)  # per row: only what it reads
            outputs = await self._triton.infer(
                {
                    contract.HISTORY_ITEMS: items,
                    contract.HISTORY_EVENT_TYPES: types,
                    contract.EXTRA_ITEM_VECTORS: extra,
                },
                deadline=deadline,
                request_id=request_id,
                model_name=contract.USER_ENCODER_MODEL,
                output_names=(contract.USER_EMBEDDING,),
            )
            vectors = np.asarray(outputs[contract.USER_EMBEDDING], dtype=np.float32)
            for row, key in enumerate(keys):
                entry = histories[key].entry
                entry.vector = vectors[row].copy()
                self._cache[key] = entry

    def _history(
        self, events: Sequence[StoredEvent], catalogue: Catalogue, version: int, retention: int
    ) -> _History:
        """The user's events as the encoder reads them (Recommend's features: unknown ids
        skipped, the newest max_history), and the cache entry that remembers what they read."""
        items: list[int] = []
        types: list[int] = []
        unknown = False
        for event in events:
            index = catalogue.index_of.get(event.item_id)
            if index is None:
                unknown = True
                continue
            items.append(index)
            types.append(_EVENT_TYPE_INDEX.get(event.event_type, _VIEW))
        items = items[-self._max_history :]
        types = types[-self._max_history :]
        n = catalogue.trained_size
        used = np.asarray(items, dtype=np.int64)
        overlay = tuple(
            (catalogue.item_ids[i], _digest(catalogue.extra_vectors[i - n - 1]))
            for i in sorted(set(items))
            if i > n
        )
        entry = _Entry(
            version=version,
            vector=None,
            events=len(items),
            expires_at=(min(e.timestamp for e in events) + retention) if events else 0,
            generation=self._generation,
            trained=np.unique(used[used <= n]),
            overlay=overlay,
            unknown=unknown,
        )
        return _History(items, types, entry)


def _digest(vector: npt.NDArray[np.float32]) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(vector).tobytes(), digest_size=8).digest()


def _still_valid(entry: _Entry, catalogue: Catalogue) -> bool:
    """Whether the entry's history reads the same rows in `catalogue` (see the docstring)."""
    if entry.unknown:
        return False
    hidden = catalogue.hidden
    if hidden.size and entry.trained.size and np.isin(entry.trained, hidden).any():
        return False
    n = catalogue.trained_size
    for item_id, digest in entry.overlay:
        index = catalogue.index_of.get(item_id)
        if index is None or index <= n:
            return False
        if _digest(catalogue.extra_vectors[index - n - 1]) != digest:
            return False
    return True
