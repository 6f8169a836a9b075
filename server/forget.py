"""ForgetUser: erase a user from the gateway's stores, and say what was erased.

Three steps, in an order that keeps every failure safe to retry (the call is idempotent):

1. An erasure record (a tombstone: `ltrec_core.erasure`, which says why a tombstone and not a
   rewrite of the log) is appended to the feedback store and fsync'd, so that every later
   retraining skips all of the user's feedback records and served lists. It holds a keyed hash
   of the user id, never the id.
2. The user's stored history is deleted (`HistoryStore.forget`), on every replica sharing the
   history store at once: the next Recommend with only the user_id has no stored history, and
   the user is in no later Audience (its users are listed from the store for every request);
   this replica also drops the user's cached vector (`server.user_vectors`).
3. The user's records now in the feedback log are counted: what retraining will skip.

A failure of 1 or 2 answers UNAVAILABLE and nothing is reported erased that was not; a retry
writes one more tombstone, which changes nothing. What the caller sends for the user while the
erasure runs (a Feedback in flight) may still join the stored history after step 2; retraining
skips it all the same, since a tombstone matches every record of the user whenever written.

The audit line (`event: forget_user`) carries the request id, the counts and the user as the
same keyed hash as the gateway's other log lines (`server.hashing`), never the id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ltrec_core.erasure import count_user_records, tombstone
from ltrec_core.records import FEEDBACK, SERVED
from server import metrics
from server.hashing import user_hash
from server.stores.feedback import FeedbackStore
from server.stores.history import HistoryStore
from server.user_vectors import UserVectors

logger = logging.getLogger(__name__)

_FORGOTTEN = {
    kind: metrics.FORGOTTEN_RECORDS_TOTAL.labels(kind=kind)
    for kind in metrics.FORGOTTEN_RECORD_KINDS
}


@dataclass(frozen=True)
class Forgotten:
    """What one ForgetUser erased."""

    history_events: int
    feedback_records: int
    served_lists: int


class UserEraser:
    def __init__(
        self,
        feedback: FeedbackStore,
        history: HistoryStore | None,
        user_hash_key: bytes,
        user_vectors: UserVectors | None = None,
    ) -> None:
        self._feedback = feedback
        self._history = history
        self._user_hash_key = user_hash_key  # the log lines' key (not the erasure key)
        self._user_vectors = user_vectors

    async def forget(self, user_id: str, request_id: str) -> Forgotten:
        """Expects a validated, non-empty user id; raises BackendUnavailable or Overloaded."""
        key = await self._feedback.erasure_key()
        record = tombstone(user_id, key, request_id, round(time.time(), 3))
        await self._feedback.append([record.to_json()])
        removed = 0 if self._history is None else await self._history.forget(user_id)
        if self._user_vectors is not None:
            self._user_vectors.forget(user_id)
        # Everything queued before the tombstone was written with it (group commit), so the
        # count covers every record acknowledged before this call.
        found = await asyncio.to_thread(count_user_records, self._feedback.directory, user_id)
        forgotten = Forgotten(removed, found[FEEDBACK], found[SERVED])
        metrics.USERS_FORGOTTEN_TOTAL.inc()
        _FORGOTTEN["history_event"].inc(forgotten.history_events)
        _FORGOTTEN["feedback"].inc(forgotten.feedback_records)
        _FORGOTTEN["served_list"].inc(forgotten.served_lists)
        logger.info(
            "user forgotten",
            extra={
                "event": "forget_user",
                "request_id": request_id,
                "user": user_hash(user_id, self._user_hash_key),
                "history_events_removed": forgotten.history_events,
                "feedback_records_erased": forgotten.feedback_records,
                "served_lists_erased": forgotten.served_lists,
            },
        )
        return forgotten
