"""Several replicas through the real stack: two gateway processes in front of one tritonserver
keep user histories in one real redis-server (Debian's, started here on a free port and stopped
by its pid), as the chart's replicas share one Redis.

What one replica learns (Feedback) the other serves (a Recommend with only the user id), the
erasure one replica takes (ForgetUser) holds for the other, and Redis going away costs the
stored history only: both replicas keep answering, from no stored history, and count it.
The in-process versions (fake Triton) are in tests/unit/test_history.py; one gateway on SQLite
through Triton is `test_serving.py`'s stored-history test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.gen.ltrec.v1 import recommender_pb2
from tests.support.redis import start_redis
from tests.support.stack import (
    CONTEXT,
    Replica,
    Stack,
    _request,
    by_user_id,
    click_feedback,
    clicks_as_history,
    start_replica,
    started_stack,
)
from triton_local.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STORED = recommender_pb2.HISTORY_SOURCE_STORED
REQUEST = recommender_pb2.HISTORY_SOURCE_REQUEST
NONE = recommender_pb2.HISTORY_SOURCE_NONE
ERRORS = "ltrec_gateway_history_store_errors_total"
BACKOFF_SECONDS = 0.5
K = 5


@dataclass
class Replicas:
    stack: Stack
    a: Replica
    b: Replica
    redis: RedisServer


def _redis_env(redis: RedisServer, name: str) -> dict[str, str]:
    return {
        "LTREC_HISTORY_STORE": "redis",
        "LTREC_HISTORY_REDIS_ADDRESS": redis.address,
        "LTREC_USER_HASH_KEY": "one-key-for-every-replica",
        # Generous for two busy cores: a slow read would serve "no stored history".
        "LTREC_HISTORY_TIMEOUT_SECONDS": "2.0",
        "LTREC_HISTORY_UNAVAILABLE_BACKOFF_SECONDS": str(BACKOFF_SECONDS),
        "LTREC_FEEDBACK_REPLICA": name,  # one feedback directory, segments of their own
    }


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, triton_build_dir: Path
) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp("shared-history")
    redis = start_redis(root / "redis")
    try:
        with started_stack(root, triton_build_dir, _redis_env(redis, "a")) as stack:
            a = Replica(stack.gateway, stack.channel, stack.stub)
            b = start_replica(
                stack.repo, stack.triton.grpc_url, root / "gateway-b.log", _redis_env(redis, "b")
            )
            try:
                yield Replicas(stack, a, b, redis)
            finally:
                b.close()
    finally:
        redis.stop()


def _ids(reply: recommender_pb2.RecommendResponse) -> list[str]:
    return [item.item_id for item in reply.items]


def _assert_same_list(
    got: recommender_pb2.RecommendResponse, want: recommender_pb2.RecommendResponse
) -> None:
    assert _ids(got) == _ids(want) and len(got.items) == K
    np.testing.assert_allclose(
        [i.score for i in got.items], [i.score for i in want.items], atol=1e-5
    )


def test_feedback_on_one_replica_is_the_stored_history_of_the_other_until_forgotten(
    replicas: Replicas,
) -> None:
    a, b, history = replicas.a, replicas.b, replicas.stack.history
    user = "replicated-user"
    served = a.stub.Recommend(_request(history, k=K), timeout=10)
    clicked = history[-3:]
    now = int(time.time()) - 60  # within the store's retention
    a.stub.FeedbackBatch(click_feedback(served.request_id, user, clicked, now), timeout=10)

    from_b = b.stub.Recommend(by_user_id(user, K), timeout=10)
    assert (from_b.history_source, from_b.history_events) == (STORED, len(clicked))
    sent = a.stub.Recommend(clicks_as_history(user, clicked, now, K), timeout=10)
    assert sent.history_source == REQUEST
    _assert_same_list(from_b, sent)
    from_a = a.stub.Recommend(by_user_id(user, K), timeout=10)
    assert (from_a.history_source, from_a.history_events) == (STORED, len(clicked))
    _assert_same_list(from_a, from_b)

    # Erased on B: gone for A at once (and A's feedback records, in the shared directory, are
    # left out of retraining).
    forgotten = b.stub.ForgetUser(recommender_pb2.ForgetUserRequest(user_id=user), timeout=10)
    assert forgotten.history_events_removed == len(clicked)
    assert forgotten.feedback_records_erased == len(clicked)
    after = a.stub.Recommend(by_user_id(user, K), timeout=10)
    assert (after.history_source, after.history_events) == (NONE, 0)
    assert _ids(after) != _ids(from_b)
    again = b.stub.ForgetUser(recommender_pb2.ForgetUserRequest(user_id=user), timeout=10)
    assert again.history_events_removed == 0


def test_redis_down_degrades_both_replicas_to_no_stored_history_counted(
    replicas: Replicas,
) -> None:
    """Runs last in this module: it kills redis-server (then starts an empty one on its port)."""
    a, b, redis = replicas.a, replicas.b, replicas.redis
    user = "user-while-redis-dies"
    clicked = replicas.stack.history[-2:]
    now = int(time.time()) - 60
    b.stub.FeedbackBatch(click_feedback("req-before", user, clicked, now), timeout=10)
    assert a.stub.Recommend(by_user_id(user, K), timeout=10).history_source == STORED

    redis.kill()
    anonymous = recommender_pb2.RecommendRequest(k=K, context=CONTEXT)  # no user: no store read
    for replica in (a, b):
        reads = replica.metric(ERRORS, op="read")
        reply = replica.stub.Recommend(by_user_id(user, K), timeout=10)
        assert (reply.history_source, reply.history_events) == (NONE, 0)
        _assert_same_list(reply, replica.stub.Recommend(anonymous, timeout=10))
        assert replica.metric(ERRORS, op="read") == reads + 1

    # Feedback is still acknowledged (the feedback store holds it); the history write is lost,
    # counted. ForgetUser cannot delete the history: UNAVAILABLE, counted, to be retried.
    writes = a.metric(ERRORS, op="write")
    accepted = a.stub.FeedbackBatch(click_feedback("req-down", user, clicked, now), timeout=10)
    assert accepted.accepted == len(clicked)
    assert a.metric(ERRORS, op="write") == writes + 1
    forgets = b.metric(ERRORS, op="forget")
    with pytest.raises(grpc.RpcError) as err:
        b.stub.ForgetUser(recommender_pb2.ForgetUserRequest(user_id=user), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert b.metric(ERRORS, op="forget") == forgets + 1

    # An empty Redis back on the same address (a restarted cache): used again after the backoff.
    restarted = RedisServer(port=redis.port, log_path=redis.log_path).start()
    try:
        time.sleep(BACKOFF_SECONDS + 0.2)
        b.stub.FeedbackBatch(click_feedback("req-after", user, clicked[:1], now), timeout=10)
        reply = a.stub.Recommend(by_user_id(user, K), timeout=10)
        assert (reply.history_source, reply.history_events) == (STORED, 1)
    finally:
        restarted.stop()
