"""ForgetUser: the user's stored history is gone at once and their feedback is gone from the next
retraining's input (`ltrec.retrain merge` on a small base dataset), with the embedded SQLite
store and with two gateways sharing a real redis-server and one feedback directory; the errors,
the audit line (the keyed hash only), the metrics and the example client."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pytest
import redis
from prometheus_client import REGISTRY

from ltrec.data import load_dataset
from ltrec.retrain import merge
from ltrec_core.erasure import KEY_FILE
from ltrec_core.feedback_log import read_records, segments
from server.gen.ltrec.v1 import recommender_pb2
from server.hashing import user_hash, user_key
from server.logs import LINE_FIELDS, TRACE_FIELDS
from server.stores.history_redis import ACTIVE_KEY, KEY_PREFIX, USERS_KEY
from tests.support.gateway import (
    FakeTransport,
    access_log,
    log_lines,
    run_async,
    running_gateway,
)
from triton_local.redis_server import RedisServer

CLICK = recommender_pb2.FEEDBACK_TYPE_CLICK
CART = recommender_pb2.FEEDBACK_TYPE_CART
PURCHASE = recommender_pb2.FEEDBACK_TYPE_PURCHASE
IMPRESSION = recommender_pb2.FEEDBACK_TYPE_IMPRESSION
STORED = recommender_pb2.HISTORY_SOURCE_STORED
NONE = recommender_pb2.HISTORY_SOURCE_NONE
ERASED, KEPT = "erased-user", "kept-user"
HASH_KEY = "shared-by-the-replicas"
AUDIT_FIELDS = (
    "event",
    "request_id",
    "user",
    "history_events_removed",
    "feedback_records_erased",
    "served_lists_erased",
)


def feedback(user: str, item: str, kind: int, timestamp: int) -> recommender_pb2.FeedbackEvent:
    return recommender_pb2.FeedbackEvent(
        request_id="req-1", user_id=user, item_id=item, type=kind, timestamp=timestamp
    )


def both_users_feedback(now: int) -> recommender_pb2.FeedbackBatchRequest:
    """i* are items of the gateway's catalogue (they make the stored history), m* of the base
    dataset's (they become retraining events)."""
    return recommender_pb2.FeedbackBatchRequest(
        events=[
            feedback(ERASED, "i2", CLICK, now - 30),
            feedback(ERASED, "m4", PURCHASE, now - 20),
            feedback(ERASED, "m8", IMPRESSION, now - 20),  # exposure: not in the history
            feedback(KEPT, "i3", CART, now - 10),
            feedback(KEPT, "m5", CLICK, now - 10),
        ]
    )


def by_user(user: str) -> recommender_pb2.RecommendRequest:
    return recommender_pb2.RecommendRequest(user_id=user, k=1)


def forget(user: str, **fields: Any) -> recommender_pb2.ForgetUserRequest:
    return recommender_pb2.ForgetUserRequest(user_id=user, **fields)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def feedback_added(tiny_data: Path, store: Path, out: Path, now: int) -> tuple[pd.DataFrame, dict]:
    """`ltrec.retrain merge` of the store into the base data: the events it added, its report."""
    report = merge(tiny_data, store, out)
    events = load_dataset(out).events
    added = events[events["timestamp"] >= now - 100]
    assert len(events) - len(added) == len(load_dataset(tiny_data).events)
    return added, report


def erasure_lines(store: Path) -> list[bytes]:
    lines = b"".join(path.read_bytes() for path in segments(store)).splitlines()
    return [line for line in lines if b'"user_erasure"' in line]


@run_async
async def test_forget_user_removes_the_stored_history_and_the_feedback_from_retraining(
    repository: Path,
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    now = int(time.time())
    store = repository.parent / "feedback"
    async with running_gateway(repository, FakeTransport()) as gw:
        await gw.stub.FeedbackBatch(both_users_feedback(now))
        assert (await gw.stub.Recommend(by_user(ERASED))).history_source == STORED

        reply = await gw.stub.ForgetUser(forget(ERASED, request_id="erase-1"))
        assert reply.request_id == "erase-1"
        # Two stored events (the impression was never kept); three feedback records and the
        # one served list of the Recommend above, all left out of retraining.
        assert (reply.history_events_removed, reply.feedback_records_erased) == (2, 3)
        assert reply.served_lists_erased == 1

        after = await gw.stub.Recommend(by_user(ERASED))
        assert (after.history_source, after.history_events) == (NONE, 0)
        assert (await gw.stub.Recommend(by_user(KEPT))).history_source == STORED
        # Idempotent: again, nothing left to delete; the records are still counted.
        again = await gw.stub.ForgetUser(forget(ERASED))
        assert (again.history_events_removed, again.feedback_records_erased) == (0, 3)
        assert again.served_lists_erased == 2  # the Recommend after the first erasure

    added, report = feedback_added(tiny_data, store, tmp_path / "merged", now)
    assert added[["user_id", "item_id", "event_type"]].values.tolist() == [[KEPT, "m5", "view"]]
    fb = report["feedback"]
    assert (fb["erasure_records"], fb["erased_users"]) == (2, 1)
    assert (fb["erased_feedback_records"], fb["erased_served_lists"]) == (3, 2)
    assert fb["feedback_by_type"] == {"cart": 1, "click": 1}  # the kept user's only
    assert fb["served_lists"] == 1  # the kept user's Recommend
    # The erasure records hold a keyed hash, never the id; the key is the log's own.
    lines = erasure_lines(store)
    assert len(lines) == 2 and not any(ERASED.encode() in line for line in lines)
    assert len((store / KEY_FILE).read_text().strip()) == 64


@run_async
async def test_forget_user_through_redis_reaches_every_replica(
    tmp_path: Path,
    repository: Path,
    tiny_data: Path,
    redis_server: RedisServer,
) -> None:
    """Two replicas share Redis and one feedback volume (as pods on one ReadWriteMany claim): an
    erasure on B deletes the history A wrote, and the feedback A took is left out of retraining."""
    now = int(time.time())
    other_repo = tmp_path / "b" / "model_repository"
    other_repo.parent.mkdir()
    other_repo.symlink_to(repository, target_is_directory=True)
    store = tmp_path / "shared-feedback"
    settings: dict[str, Any] = {
        "history_store": "redis",
        "history_redis_address": redis_server.address,
        "user_hash_key": HASH_KEY,
        "history_timeout_seconds": 1.0,
        "history_unavailable_backoff_seconds": 0.2,
        "feedback_dir": store,
    }
    errors = "ltrec_gateway_history_store_errors_total"
    async with (
        running_gateway(repository, FakeTransport(), feedback_replica="gw-a", **settings) as a,
        running_gateway(other_repo, FakeTransport(), feedback_replica="gw-b", **settings) as b,
    ):
        await a.stub.FeedbackBatch(both_users_feedback(now))
        assert (await b.stub.Recommend(by_user(ERASED))).history_source == STORED

        reply = await b.stub.ForgetUser(forget(ERASED))
        assert (reply.history_events_removed, reply.feedback_records_erased) == (2, 3)
        assert (await a.stub.Recommend(by_user(ERASED))).history_source == NONE
        assert (await a.stub.Recommend(by_user(KEPT))).history_source == STORED
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        kept = user_key(KEPT, HASH_KEY.encode())
        assert sorted(client.keys(f"{KEY_PREFIX}*")) == sorted(
            [f"{KEY_PREFIX}{kept}".encode(), USERS_KEY.encode(), ACTIVE_KEY.encode()]
        )
        # and its user entries (Audience's list) hold only the kept user
        assert client.hkeys(USERS_KEY) == [kept.encode()]
        assert client.zrange(ACTIVE_KEY, 0, -1) == [kept.encode()]
        client.close()

        # Redis down: the history cannot be deleted, so the erasure is not reported done.
        redis_server.stop()
        failed = sample(errors, {"op": "forget"})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await b.stub.ForgetUser(forget(KEPT), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot delete the user's history now; retry" in (caught.value.details() or "")
        assert sample(errors, {"op": "forget"}) == failed + 1

    added, report = feedback_added(tiny_data, store, tmp_path / "merged", now)
    # The kept user's feedback stays out too: the failed call's erasure record was written (a
    # retry would write another), which errs on the side of erasing.
    assert added.empty
    assert report["feedback"]["erased_users"] == 2
    assert {p.name.rsplit("-", 1)[0] for p in segments(store)} == {"feedback-gw-a", "feedback-gw-b"}


@run_async
async def test_invalid_forget_requests_name_the_field_and_erase_nothing(repository: Path) -> None:
    cases = {
        "user_id must be non-empty (the user to forget)": forget(""),
        "user_id must be at most 256 characters, got 257": forget("x" * 257),
        "request_id must contain printable ASCII characters only": forget("u1", request_id="é"),
        "request_id must be at most 128 characters, got 129": forget("u1", request_id="r" * 129),
    }
    now = int(time.time())
    store = repository.parent / "feedback"
    async with running_gateway(repository, FakeTransport()) as gw:
        await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(event=feedback("u1", "i2", CLICK, now))
        )
        for message, request in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.ForgetUser(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == message
        assert (await gw.stub.Recommend(by_user("u1"))).history_source == STORED
    assert erasure_lines(store) == [] and not (store / KEY_FILE).exists()
    # 256 characters is within the bound.
    async with running_gateway(repository, FakeTransport()) as gw:
        reply = await gw.stub.ForgetUser(forget("x" * 256))
    assert (reply.history_events_removed, reply.feedback_records_erased) == (0, 0)


@run_async
async def test_the_audit_line_and_the_metrics_carry_no_user_id(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a history store too: only the feedback is erased. The audit line's user is the
    keyed hash of the access log (the same key), so the two join; the id is nowhere."""
    caplog.set_level(logging.DEBUG)
    user = "carol@example.com"
    now = int(time.time())
    before = {
        "users": sample("ltrec_gateway_users_forgotten_total"),
        "feedback": sample("ltrec_gateway_forgotten_records_total", {"kind": "feedback"}),
        "ok": sample("ltrec_gateway_requests_total", {"method": "ForgetUser", "code": "OK"}),
    }
    settings = {"history_store": "off", "user_hash_key": "audit-key"}
    async with running_gateway(repository, FakeTransport(), **settings) as gw:
        await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(event=feedback(user, "i2", CLICK, now))
        )
        reply = await gw.stub.ForgetUser(forget(user, request_id="erase-2"))
    assert (reply.history_events_removed, reply.feedback_records_erased) == (0, 1)
    assert "carol" not in caplog.text
    (audit,) = log_lines(caplog, "forget_user")
    hashed = user_hash(user, b"audit-key")
    assert {key: audit.get(key) for key in AUDIT_FIELDS} == {
        "event": "forget_user",
        "request_id": "erase-2",
        "user": hashed,
        "history_events_removed": 0,
        "feedback_records_erased": 1,
        "served_lists_erased": 0,
    }
    assert set(audit) <= {*AUDIT_FIELDS, *LINE_FIELDS, *TRACE_FIELDS}  # nothing more on the user
    (rpc,) = [line for line in access_log(caplog) if line["method"] == "ForgetUser"]
    assert (rpc["user"], rpc["code"], rpc["request_id"]) == (hashed, "OK", "erase-2")
    assert sample("ltrec_gateway_users_forgotten_total") == before["users"] + 1
    assert (
        sample("ltrec_gateway_forgotten_records_total", {"kind": "feedback"})
        == before["feedback"] + 1
    )
    ok = sample("ltrec_gateway_requests_total", {"method": "ForgetUser", "code": "OK"})
    assert ok == before["ok"] + 1
    kept = [r for r in read_records(repository.parent / "feedback") if r["kind"] == "feedback"]
    assert [r["user_id"] for r in kept] == [user]  # training data keeps it; retraining skips it


@run_async
async def test_example_client_forgets_a_user(repository: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    async with running_gateway(repository, FakeTransport()) as gw:
        await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(
                event=feedback("client-user", "i2", CLICK, int(time.time()))
            )
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "examples/recommend_client.py", "--address", gw.address,
            "--user", "client-user", "--forget",
            cwd=root, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=20)
        assert process.returncode == 0, err.decode()
        assert (await gw.stub.Recommend(by_user("client-user"))).history_source == NONE
    assert (
        "1 stored history events removed; 1 feedback records and 0 served lists left out of "
        "retraining" in out.decode()
    )
