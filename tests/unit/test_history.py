"""Recommend with only a user_id: the gateway's stored history, in-process against the fake
Triton, with the embedded SQLite store and with two gateways sharing one real redis-server."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from ltrec_core import contract
from ltrec_core.feedback_log import read_records
from server.gen.ltrec.v1 import recommender_pb2
from tests.support.gateway import (
    METADATA,
    FakeTransport,
    event,
    run_async,
    running_gateway,
)
from triton_local.redis_server import RedisServer

CLICK = recommender_pb2.FEEDBACK_TYPE_CLICK
CART = recommender_pb2.FEEDBACK_TYPE_CART
PURCHASE = recommender_pb2.FEEDBACK_TYPE_PURCHASE
IMPRESSION = recommender_pb2.FEEDBACK_TYPE_IMPRESSION
VIEW = recommender_pb2.EVENT_TYPE_VIEW
REQUEST = recommender_pb2.HISTORY_SOURCE_REQUEST
STORED = recommender_pb2.HISTORY_SOURCE_STORED
NONE = recommender_pb2.HISTORY_SOURCE_NONE
# contract.EVENT_TYPES positions + 1
VIEW_INDEX, CART_INDEX, PURCHASE_INDEX = 1, 2, 3
HASH_KEY = "shared-by-the-replicas"


def feedback(user: str, item: str, kind: int, timestamp: int) -> recommender_pb2.FeedbackEvent:
    return recommender_pb2.FeedbackEvent(
        request_id="req-1", user_id=user, item_id=item, type=kind, timestamp=timestamp
    )


def by_user(user: str, **fields: Any) -> recommender_pb2.RecommendRequest:
    return recommender_pb2.RecommendRequest(user_id=user, k=1, **fields)


def sent_history(fake: FakeTransport) -> tuple[list[int], list[int]]:
    """The history the last Recommend sent to Triton: catalogue indices, event type indices,
    without the left padding (to the max_history of 3 here): [] for none."""
    inputs = fake.ranking_calls()[-1].inputs
    items = inputs[contract.HISTORY_ITEMS][0]
    assert items.shape == (3,)
    real = items != contract.PADDING_INDEX
    assert real[int(np.argmax(real)) :].all() or not real.any()  # left-padded: padding first
    return items[real].tolist(), inputs[contract.HISTORY_EVENT_TYPES][0][real].tolist()


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def redis_settings(server: RedisServer) -> dict[str, Any]:
    return {
        "history_store": "redis",
        "history_redis_address": server.address,
        "user_hash_key": HASH_KEY,
        "history_timeout_seconds": 1.0,
        "history_unavailable_backoff_seconds": 0.2,
    }


@run_async
async def test_feedback_becomes_the_history_of_a_recommend_with_only_a_user_id(
    repository: Path,
) -> None:
    now = int(time.time())
    fake = FakeTransport()
    stored = sample("ltrec_gateway_recommend_history_source_total", {"source": "stored"})
    async with running_gateway(repository, fake) as gw:
        reply = await gw.stub.Recommend(by_user("u1"))
        assert (reply.history_source, reply.history_events) == (NONE, 0)
        assert sent_history(fake) == ([], [])
        await gw.stub.FeedbackBatch(
            recommender_pb2.FeedbackBatchRequest(
                events=[
                    feedback("u1", "i2", CLICK, now - 30),
                    feedback("u1", "i5", IMPRESSION, now - 20),  # exposure: not kept
                    feedback("u1", "i3", PURCHASE, now - 10),
                    feedback("u2", "i6", CART, now - 10),  # another user's
                    feedback("u1", "gone", CLICK, now - 5),  # not in the catalogue: skipped
                ]
            )
        )
        reply = await gw.stub.Recommend(by_user("u1"))
        assert reply.history_source == STORED
        assert (reply.history_events, reply.skipped_history_items) == (2, 1)
        assert sent_history(fake) == ([2, 3], [VIEW_INDEX, PURCHASE_INDEX])
        # The stored history excludes its items from the results, as a request's does.
        reply = await gw.stub.Recommend(by_user("u2"))
        assert (reply.history_source, sent_history(fake)) == (STORED, ([6], [CART_INDEX]))
    assert (
        sample("ltrec_gateway_recommend_history_source_total", {"source": "stored"}) == stored + 2
    )


@run_async
async def test_the_embedded_store_survives_a_gateway_restart(repository: Path) -> None:
    """Without LTREC_USER_HASH_KEY the SQLite file keeps its own key, so users find their
    history again after a restart."""
    now = int(time.time())
    async with running_gateway(repository, FakeTransport()) as gw:
        await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(event=feedback("u1", "i4", CART, now))
        )
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        reply = await gw.stub.Recommend(by_user("u1"))
    assert (reply.history_source, reply.history_events) == (STORED, 1)
    assert sent_history(fake) == ([4], [CART_INDEX])


@run_async
async def test_the_history_is_bounded_by_the_models_max_history(repository: Path) -> None:
    now = int(time.time())
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        events = [feedback("u1", f"i{n}", CLICK, now - 100 + n) for n in range(1, 7)]
        await gw.stub.FeedbackBatch(recommender_pb2.FeedbackBatchRequest(events=events))
        reply = await gw.stub.Recommend(by_user("u1"))
    assert METADATA["max_history"] == 3
    assert reply.history_events == 3
    assert sent_history(fake)[0] == [4, 5, 6]  # the newest three


@run_async
async def test_a_requests_own_history_wins_over_the_stored_one(repository: Path) -> None:
    now = int(time.time())
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(event=feedback("u1", "i2", CLICK, now))
        )
        reply = await gw.stub.Recommend(by_user("u1", history=[event("i5", VIEW, now - 7)]))
        assert (reply.history_source, reply.history_events) == (REQUEST, 1)
        assert sent_history(fake)[0] == [5]
        # Not remembered: the stored history is unchanged.
        reply = await gw.stub.Recommend(by_user("u1"))
        assert (reply.history_source, sent_history(fake)[0]) == (STORED, [2])


@run_async
async def test_remember_history_keeps_a_requests_events_once(repository: Path) -> None:
    now = int(time.time())
    fake = FakeTransport()
    history = [
        event("i1", VIEW, now - 50),
        event("i3", recommender_pb2.EVENT_TYPE_PURCHASE, now - 40),
        event("i6", VIEW, 0),  # no timestamp: not kept
    ]
    async with running_gateway(repository, fake) as gw:
        for _ in range(2):  # the caller sends the same history again: nothing is kept twice
            reply = await gw.stub.Recommend(by_user("u1", history=history, remember_history=True))
            assert reply.history_source == REQUEST
        reply = await gw.stub.Recommend(by_user("u1"))
    assert (reply.history_source, reply.history_events) == (STORED, 2)
    assert sent_history(fake) == ([1, 3], [VIEW_INDEX, PURCHASE_INDEX])


@run_async
async def test_stored_history_max_age_reads_only_recent_events(repository: Path) -> None:
    now = int(time.time())
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        await gw.stub.FeedbackBatch(
            recommender_pb2.FeedbackBatchRequest(
                events=[
                    feedback("u1", "i1", CLICK, now - 7200),
                    feedback("u1", "i2", CLICK, now - 60),
                ]
            )
        )
        reply = await gw.stub.Recommend(by_user("u1", stored_history_max_age_seconds=3600))
        assert (reply.history_events, sent_history(fake)[0]) == (1, [2])
        reply = await gw.stub.Recommend(by_user("u1", stored_history_max_age_seconds=30))
        assert (reply.history_source, sent_history(fake)[0]) == (NONE, [])


@run_async
async def test_events_older_than_the_retention_are_not_used(repository: Path) -> None:
    now = int(time.time())
    fake = FakeTransport()
    async with running_gateway(repository, fake, history_retention_seconds=3600) as gw:
        await gw.stub.FeedbackBatch(
            recommender_pb2.FeedbackBatchRequest(
                events=[
                    feedback("u1", "i1", CLICK, now - 4000),
                    feedback("u1", "i2", CLICK, now - 10),
                ]
            )
        )
        reply = await gw.stub.Recommend(by_user("u1"))
    assert (reply.history_events, sent_history(fake)[0]) == (1, [2])


@run_async
async def test_without_a_store_a_user_id_alone_gets_no_history(repository: Path) -> None:
    fake = FakeTransport()
    async with running_gateway(repository, fake, history_store="off") as gw:
        await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(event=feedback("u1", "i2", CLICK, int(time.time())))
        )
        reply = await gw.stub.Recommend(by_user("u1"))
        assert gw.server.history is None
    assert (reply.history_source, sent_history(fake)[0]) == (NONE, [])
    assert not (repository.parent / "history").exists()


@run_async
async def test_example_client_remembers_a_history_then_recommends_by_user_id(
    repository: Path,
) -> None:
    """`make client CLIENT_ARGS=--remember`, then `--user-only` (the fake catalogue knows none
    of its MovieLens titles: the stored events come back and are counted as unknown)."""
    root = Path(__file__).resolve().parents[2]

    async def client(address: str, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "examples/recommend_client.py", "--address", address, "-k", "1",
            "--user", "client-user", *args,
            cwd=root, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=20)
        assert process.returncode == 0, err.decode()
        return out.decode()

    async with running_gateway(repository, FakeTransport()) as gw:
        address = gw.address
        assert "history: none (0 events)" in await client(address, "--user-only")
        for _ in range(2):
            assert "history: request (0 events, 12 not in the catalogue)" in await client(
                address, "--remember"
            )
        # The newest max_history (3) of them were kept.
        assert "history: stored (0 events, 3 not in the catalogue)" in await client(
            address, "--user-only"
        )


# --- several replicas: one Redis ------------------------------------------------------------------


@run_async
async def test_two_gateways_share_the_history_through_redis(
    tmp_path: Path, repository: Path, redis_server: RedisServer
) -> None:
    """Feedback taken by one replica is the history of a Recommend with only a user_id on the
    other (each with its own feedback store directory, as pods have)."""
    now = int(time.time())
    other_repo = tmp_path / "b" / "model_repository"
    other_repo.parent.mkdir()
    other_repo.symlink_to(repository, target_is_directory=True)
    fake_a, fake_b = FakeTransport(), FakeTransport()
    settings = redis_settings(redis_server)
    async with (
        running_gateway(repository, fake_a, **settings) as a,
        running_gateway(other_repo, fake_b, **settings) as b,
    ):
        await a.stub.FeedbackBatch(
            recommender_pb2.FeedbackBatchRequest(
                events=[feedback("u1", "i4", CLICK, now - 20), feedback("u1", "i2", CART, now - 10)]
            )
        )
        reply = await b.stub.Recommend(by_user("u1"))
        assert (reply.history_source, reply.history_events) == (STORED, 2)
        assert sent_history(fake_b) == ([4, 2], [VIEW_INDEX, CART_INDEX])
        # And back: a remembered request history on B serves A.
        await b.stub.Recommend(
            by_user("u2", history=[event("i6", VIEW, now - 5)], remember_history=True)
        )
        reply = await a.stub.Recommend(by_user("u2"))
        assert (reply.history_source, sent_history(fake_a)[0]) == (STORED, [6])
    assert (tmp_path / "b" / "feedback").is_dir()  # the replicas' own feedback stores


@run_async
async def test_redis_down_degrades_to_no_stored_history_counted_not_failed(
    repository: Path, redis_server: RedisServer
) -> None:
    now = int(time.time())
    fake = FakeTransport()
    errors = "ltrec_gateway_history_store_errors_total"
    async with running_gateway(repository, fake, **redis_settings(redis_server)) as gw:
        await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(event=feedback("u1", "i2", CLICK, now))
        )
        assert (await gw.stub.Recommend(by_user("u1"))).history_source == STORED

        redis_server.stop()
        reads, writes = sample(errors, {"op": "read"}), sample(errors, {"op": "write"})
        reply = await gw.stub.Recommend(by_user("u1"), timeout=5)
        assert (reply.history_source, reply.history_events) == (NONE, 0)
        assert len(reply.items) == 1 and sent_history(fake) == ([], [])  # as with no history
        assert sample(errors, {"op": "read"}) == reads + 1
        # Feedback is still acknowledged: it is on disk in the feedback store; only the history
        # write is lost, and counted.
        accepted = await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(event=feedback("u1", "i3", PURCHASE, now)), timeout=5
        )
        assert accepted.accepted == 1
        assert sample(errors, {"op": "write"}) == writes + 1
        kept = [r for r in read_records(repository.parent / "feedback") if r["kind"] == "feedback"]
        assert [r["item_id"] for r in kept] == ["i2", "i3"]
        # A request's own history does not need the store.
        reply = await gw.stub.Recommend(by_user("u1", history=[event("i5", VIEW, now)]))
        assert (reply.history_source, sent_history(fake)[0]) == (REQUEST, [5])

        # Back up (empty, as a restarted cache would be): used again after the backoff.
        restarted = RedisServer(port=redis_server.port).start()
        try:
            time.sleep(0.3)
            await gw.stub.Feedback(
                recommender_pb2.FeedbackRequest(event=feedback("u1", "i1", CLICK, now))
            )
            reply = await gw.stub.Recommend(by_user("u1"))
            assert (reply.history_source, sent_history(fake)[0]) == (STORED, [1])
        finally:
            restarted.stop()


@run_async
async def test_no_user_id_in_clear_in_the_logs(
    repository: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user = "carol@example.com"
    async with running_gateway(repository, FakeTransport(), **redis_settings(redis_server)) as gw:
        await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(event=feedback(user, "i2", CLICK, int(time.time())))
        )
        await gw.stub.Recommend(by_user(user))
        redis_server.stop()
        await gw.stub.Recommend(by_user(user))  # the failure is logged, without the user
    assert "carol" not in caplog.text
    assert "history store (redis): read failed" in caplog.text


# --- validation ----------------------------------------------------------------------------------

NOW_EVENT = event("i1", VIEW, 1_700_000_000)
INVALID = {
    "remember without user_id": (
        recommender_pb2.RecommendRequest(k=1, history=[NOW_EVENT], remember_history=True),
        "user_id must be non-empty when remember_history is set",
    ),
    "remember without history": (
        by_user("u1", remember_history=True),
        "history must be non-empty when remember_history is set",
    ),
    "max age zero": (
        by_user("u1", stored_history_max_age_seconds=0),
        "stored_history_max_age_seconds must be in [1, 2592000] (the retention), got 0",
    ),
    "max age beyond the retention": (
        by_user("u1", stored_history_max_age_seconds=2592001),
        "stored_history_max_age_seconds must be in [1, 2592000] (the retention), got 2592001",
    ),
    "max age without user_id": (
        recommender_pb2.RecommendRequest(k=1, stored_history_max_age_seconds=60),
        "user_id must be non-empty when stored_history_max_age_seconds is set",
    ),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
@run_async
async def test_invalid_history_options_name_the_field(
    repository: Path, case: tuple[recommender_pb2.RecommendRequest, str]
) -> None:
    request, message = case
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    assert fake.calls == []


@run_async
async def test_remember_history_without_a_store_is_invalid(repository: Path) -> None:
    request = by_user("u1", history=[NOW_EVENT], remember_history=True)
    async with running_gateway(repository, FakeTransport(), history_store="off") as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "remember_history cannot be set: this gateway keeps no user history" in (
        caught.value.details() or ""
    )
