"""The Feedback RPCs and the durable feedback store, in-process against the fake Triton."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from ltrec_core import segment_log as feedback_store
from ltrec_core.feedback_log import ReadStats, read_records, segments
from server.config import ConfigError, GatewayConfig
from server.gen.ltrec.v1 import recommender_pb2
from server.stores.feedback import FeedbackStore
from tests.support.gateway import (
    FakeTransport,
    full_request,
    outputs,
    run_async,
    running_gateway,
    write_repository,
)

CLICK = recommender_pb2.FEEDBACK_TYPE_CLICK
PURCHASE = recommender_pb2.FEEDBACK_TYPE_PURCHASE


def feedback_event(n: int = 0, **changes: Any) -> recommender_pb2.FeedbackEvent:
    fields: dict[str, Any] = {
        "request_id": f"req-{n}",
        "user_id": f"user-{n % 7}",
        "item_id": "i2",
        "type": CLICK,
        "timestamp": 1_700_000_000 + n,
        "position": n % 10,
        "context": recommender_pb2.Context(device="mobile", region="zip1"),
    }
    fields.update(changes)
    return recommender_pb2.FeedbackEvent(**fields)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "model_repository")


def feedback_records(directory: Path) -> list[dict[str, Any]]:
    return [r for r in read_records(directory) if r["kind"] == "feedback"]


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


@run_async
async def test_feedback_is_on_disk_when_acknowledged(repository: Path) -> None:
    store_dir = repository.parent / "feedback"
    before = sample("ltrec_gateway_feedback_events_total", {"type": "purchase"})
    async with running_gateway(repository, FakeTransport()) as gw:
        reply = await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(event=feedback_event(3, type=PURCHASE))
        )
        assert reply.accepted == 1
        # Readable while the gateway still runs: acknowledged means written and synced.
        (record,) = feedback_records(store_dir)
    assert record == {
        "kind": "feedback",
        "request_id": "req-3",
        "user_id": "user-3",
        "item_id": "i2",
        "type": "purchase",
        "timestamp": 1_700_000_003,
        "position": 3,
        "device": "mobile",
        "region": "zip1",
        "model_version": "20261129-ab12cd",
        "received_at": pytest.approx(time.time(), abs=60),
    }
    assert sample("ltrec_gateway_feedback_events_total", {"type": "purchase"}) == before + 1


@run_async
async def test_feedback_without_timestamp_or_position_gets_the_gateway_time(
    repository: Path,
) -> None:
    event = feedback_event(timestamp=0)
    event.ClearField("position")
    async with running_gateway(repository, FakeTransport()) as gw:
        await gw.stub.Feedback(recommender_pb2.FeedbackRequest(event=event))
    (record,) = feedback_records(repository.parent / "feedback")
    assert abs(record["timestamp"] - time.time()) < 60
    assert record["position"] is None


@run_async
async def test_recommend_logs_the_served_list(repository: Path) -> None:
    fake = FakeTransport(outputs([5], [2.0], [0]))
    async with running_gateway(repository, fake) as gw:
        reply = await gw.stub.Recommend(full_request())
    served = [r for r in read_records(repository.parent / "feedback") if r["kind"] == "served"]
    assert served == [
        {
            "kind": "served",
            "request_id": "req-123",
            "user_id": "user-42",
            "items": [item.item_id for item in reply.items],
            "model_version": "20261129-ab12cd",
            "timestamp": full_request().context.timestamp,
            "device": " Mobile ",
            "region": "zip9",
        }
    ]
    assert served[0]["items"] == ["i5"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"item_id": ""}, "events[2].item_id must be non-empty"),
        ({"request_id": ""}, "events[2].request_id must be non-empty"),
        ({"request_id": "r\u00e9q"}, "events[2].request_id must contain printable ASCII"),
        ({"user_id": ""}, "events[2].user_id must be non-empty"),
        ({"user_id": "u" * 257}, "events[2].user_id must be at most 256 characters"),
        ({"type": 0}, "events[2].type must be one of IMPRESSION, CLICK, CART, PURCHASE, got 0"),
        ({"type": 9}, "events[2].type must be one of"),
        ({"timestamp": -1}, "events[2].timestamp must be in [0, 253402300799], got -1"),
        ({"position": 500}, "events[2].position must be in [0, 499], got 500"),
        ({"position": -1}, "events[2].position must be in [0, 499], got -1"),
        (
            {"context": recommender_pb2.Context(device="d" * 65)},
            "events[2].context.device must be at most 64 characters",
        ),
    ],
)
def test_a_bad_event_rejects_the_whole_batch_naming_it(
    repository: Path, bad: dict[str, Any], message: str
) -> None:
    events = [feedback_event(0), feedback_event(1), feedback_event(2, **bad), feedback_event(3)]

    async def scenario() -> None:
        async with running_gateway(repository, FakeTransport()) as gw:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.FeedbackBatch(recommender_pb2.FeedbackBatchRequest(events=events))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (caught.value.details() or "")
            # Single-event form names the field without an index.
            with pytest.raises(grpc.aio.AioRpcError) as single:
                await gw.stub.Feedback(recommender_pb2.FeedbackRequest(event=events[2]))
            assert message.replace("events[2]", "event") in (single.value.details() or "")

    asyncio.run(scenario())
    assert feedback_records(repository.parent / "feedback") == []


@run_async
async def test_batch_size_bounds(repository: Path) -> None:
    async with running_gateway(repository, FakeTransport(), feedback_max_batch=5) as gw:
        for count in (0, 6):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.FeedbackBatch(
                    recommender_pb2.FeedbackBatchRequest(
                        events=[feedback_event(n) for n in range(count)]
                    )
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"events must have between 1 and 5 events, got {count}" in (
                caught.value.details() or ""
            )
        reply = await gw.stub.FeedbackBatch(
            recommender_pb2.FeedbackBatchRequest(events=[feedback_event(n) for n in range(5)])
        )
        assert reply.accepted == 5
    assert [r["request_id"] for r in feedback_records(repository.parent / "feedback")] == [
        f"req-{n}" for n in range(5)
    ]


@run_async
async def test_concurrent_feedback_is_group_committed_and_nothing_is_lost(
    repository: Path,
) -> None:
    commits_before = sample("ltrec_gateway_feedback_commit_duration_seconds_count")
    async with running_gateway(repository, FakeTransport()) as gw:
        replies = await asyncio.gather(
            *(
                gw.stub.Feedback(recommender_pb2.FeedbackRequest(event=feedback_event(n)))
                for n in range(300)
            )
        )
    assert all(reply.accepted == 1 for reply in replies)
    ids = sorted(int(r["request_id"][4:]) for r in feedback_records(repository.parent / "feedback"))
    assert ids == list(range(300))
    commits = sample("ltrec_gateway_feedback_commit_duration_seconds_count") - commits_before
    assert 1 <= commits < 300  # several acknowledgements per fsync


@run_async
async def test_segments_rotate_and_a_restart_starts_a_new_one(repository: Path) -> None:
    store_dir = repository.parent / "feedback"
    for round_ in range(2):
        async with running_gateway(
            repository, FakeTransport(), feedback_max_segment_bytes=4096, feedback_replica="pod-a"
        ) as gw:
            for n in range(40):
                await gw.stub.Feedback(
                    recommender_pb2.FeedbackRequest(event=feedback_event(round_ * 100 + n))
                )
    files = segments(store_dir)
    assert len(files) >= 4
    assert all(path.name.startswith("feedback-pod-a-") for path in files)
    assert all(path.stat().st_size <= 4096 + 400 for path in files)
    ids = [int(r["request_id"][4:]) for r in feedback_records(store_dir)]
    assert ids == [*range(40), *range(100, 140)]  # write order


@run_async
async def test_a_failed_write_is_not_acknowledged_and_not_kept(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sync = os.fdatasync
    failures = iter([True])

    def flaky_sync(fd: int) -> None:
        if next(failures, False):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_sync(fd)

    monkeypatch.setattr(feedback_store.os, "fdatasync", flaky_sync)
    errors_before = sample("ltrec_gateway_feedback_write_errors_total")
    async with running_gateway(repository, FakeTransport()) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Feedback(recommender_pb2.FeedbackRequest(event=feedback_event(1)))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "No space left on device" in (caught.value.details() or "")
        await gw.stub.Feedback(recommender_pb2.FeedbackRequest(event=feedback_event(2)))
    assert [r["request_id"] for r in feedback_records(repository.parent / "feedback")] == ["req-2"]
    assert sample("ltrec_gateway_feedback_write_errors_total") == errors_before + 1


@run_async
async def test_a_slow_disk_sheds_feedback_with_resource_exhausted(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sync = os.fdatasync

    def slow_sync(fd: int) -> None:
        time.sleep(0.3)
        real_sync(fd)

    monkeypatch.setattr(feedback_store.os, "fdatasync", slow_sync)
    async with running_gateway(repository, FakeTransport(), feedback_max_pending=10) as gw:
        results = await asyncio.gather(
            *(
                gw.stub.Feedback(recommender_pb2.FeedbackRequest(event=feedback_event(n)))
                for n in range(40)
            ),
            return_exceptions=True,
        )
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert failed and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in failed)
    assert "limit 10" in (failed[0].details() or "")
    acknowledged = len(results) - len(failed)
    assert len(feedback_records(repository.parent / "feedback")) == acknowledged


def test_reader_skips_a_torn_tail_and_counts_it(tmp_path: Path) -> None:
    async def write() -> None:
        store = FeedbackStore(tmp_path, replica="r1")
        store.open()
        await store.start()
        await store.append([{"kind": "feedback", "n": 1}, {"kind": "feedback", "n": 2}])
        await store.close()

    asyncio.run(write())
    (segment,) = segments(tmp_path)
    with segment.open("ab") as handle:
        handle.write(b'{"kind": "feedback", "n": 3')  # a crash mid-write
    nul = tmp_path / "feedback-r1-000002.jsonl"
    nul.write_bytes(b'{"kind":"served","n":4}\n' + b"\0" * 64)  # size grew, data never came
    stats = ReadStats()
    assert [r["n"] for r in read_records(tmp_path, stats)] == [1, 2, 4]
    assert (stats.segments, stats.records, stats.unreadable_lines) == (2, 3, 1)
    assert stats.by_kind == {"feedback": 2, "served": 1}


def test_offered_records_are_encoded_off_the_event_loop_in_order(tmp_path: Path) -> None:
    """A record object given to `offer` (Recommend's served list) becomes its JSON line in the
    writer's thread, not on the request's event loop, and lands between the records appended
    before and after it, in order."""
    import threading

    encoded_in: list[str] = []

    class Served:
        def __init__(self, n: int) -> None:
            self.n = n

        def to_json(self) -> dict[str, Any]:
            encoded_in.append(threading.current_thread().name)
            return {"kind": "served", "n": self.n}

    async def write() -> str:
        store = FeedbackStore(tmp_path, replica="r1")
        store.open()
        await store.start()
        store.offer(Served(1))
        store.offer({"kind": "served", "n": 2})  # a dict still works
        await store.append([{"kind": "feedback", "n": 3}])
        store.offer(Served(4))
        await store.close()
        return threading.current_thread().name

    loop_thread = asyncio.run(write())
    assert [r["n"] for r in read_records(tmp_path)] == [1, 2, 3, 4]
    assert len(encoded_in) == 2 and loop_thread not in encoded_in


def test_an_offered_record_that_cannot_be_encoded_is_dropped_alone(tmp_path: Path) -> None:
    """Encoding happens in the writer's thread: a record it cannot encode is dropped and
    counted, and neither its batch nor later records are lost."""
    dropped_before = sample("ltrec_gateway_feedback_served_lists_dropped_total")

    async def write() -> None:
        store = FeedbackStore(tmp_path, replica="r1")
        store.open()
        await store.start()
        store.offer({"kind": "served", "n": 1})
        store.offer({"kind": "served", "n": object()})  # not JSON
        await store.append([{"kind": "feedback", "n": 2}])  # the same batch
        await store.append([{"kind": "feedback", "n": 3}])  # the writer still runs
        await store.close()

    asyncio.run(write())
    assert [r["n"] for r in read_records(tmp_path)] == [1, 2, 3]
    assert sample("ltrec_gateway_feedback_served_lists_dropped_total") - dropped_before == 1


def test_replica_names_are_file_name_safe() -> None:
    assert feedback_store.replica_name("ltrec-gateway-7d9f/../x y") == "ltrec-gateway-7d9f_.._x_y"
    assert feedback_store.replica_name("")  # the host name


def test_plaintext_must_be_allowed_explicitly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LTREC_ALLOW_PLAINTEXT must be true to serve without"):
        GatewayConfig.from_env({})
    assert GatewayConfig.from_env({"LTREC_ALLOW_PLAINTEXT": "yes"}).allow_plaintext
    with pytest.raises(ConfigError, match="LTREC_ALLOW_PLAINTEXT must be one of true/false"):
        GatewayConfig.from_env({"LTREC_ALLOW_PLAINTEXT": "maybe"})
    with pytest.raises(ConfigError, match="LTREC_FEEDBACK_DIR must be a non-empty path"):
        GatewayConfig.from_env({"LTREC_ALLOW_PLAINTEXT": "1", "LTREC_FEEDBACK_DIR": " "})
    with pytest.raises(ConfigError, match="LTREC_FEEDBACK_MAX_SEGMENT_BYTES must be >= 4096"):
        GatewayConfig.from_env(
            {"LTREC_ALLOW_PLAINTEXT": "1", "LTREC_FEEDBACK_MAX_SEGMENT_BYTES": "100"}
        )
