"""Audience and ForecastDemand through the gateway against a fake Triton whose user encoder and
audience ensemble compute in numpy (`tests.support.gateway.fake_audience`): the users of the
history store come back as the caller's ids, best first; bounds and errors name the field;
ForgetUser takes a user out at once; user vectors are cached and re-encoded exactly when their
history or the catalogue rows it reads change; the users go in blocks whose merge is the one-call
answer; metrics and log lines carry no id; the example client."""

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
from prometheus_client import REGISTRY, generate_latest

import server.audience
from ltrec_core import contract
from server.gen.ltrec.v1 import recommender_pb2
from tests.support.gateway import (
    METADATA,
    FakeTransport,
    access_log,
    run_async,
    running_gateway,
)

CLICK = recommender_pb2.FEEDBACK_TYPE_CLICK
ACTION = ["i1", "i2"]  # the fake table's "action" items (i3 is one too)
DRAMA = ["i4", "i5"]  # and "drama" (i6)


def click(user: str, item: str, timestamp: int) -> recommender_pb2.FeedbackEvent:
    return recommender_pb2.FeedbackEvent(
        request_id="req-a", user_id=user, item_id=item, type=CLICK, timestamp=timestamp
    )


async def clicks(gw: Any, histories: dict[str, list[str]], now: int) -> None:
    """Each user's clicks, the users in order of activity (the last one most recent)."""
    events = [
        click(user, item, now - 1000 + 10 * u + n)
        for u, (user, items) in enumerate(histories.items())
        for n, item in enumerate(items)
    ]
    await gw.stub.FeedbackBatch(recommender_pb2.FeedbackBatchRequest(events=events))


def audience(item_id: str, k: int = 10, **fields: Any) -> recommender_pb2.AudienceRequest:
    return recommender_pb2.AudienceRequest(item_id=item_id, k=k, **fields)


def forecast(*item_ids: str, **fields: Any) -> recommender_pb2.ForecastDemandRequest:
    return recommender_pb2.ForecastDemandRequest(item_ids=list(item_ids), **fields)


def encoded_users(fake: FakeTransport) -> int:
    """Users the fake user encoder was asked to encode so far."""
    calls = [c for c in fake.calls if c.model_name == contract.USER_ENCODER_MODEL]
    return sum(len(c.inputs[contract.HISTORY_ITEMS]) for c in calls)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


HISTORIES = {
    "action-fan": ACTION * 2 + ["i3"],  # 5 events
    "drama-fan": DRAMA + ["i6"],  # 3 events
    "mixed": ["i1", "i4"],
    "action-light": ["i1"],
}


@run_async
async def test_the_users_whose_history_is_about_the_item_come_first_as_their_ids(
    repository: Path,
) -> None:
    now = int(time.time())
    async with running_gateway(repository, FakeTransport()) as gw:
        await clicks(gw, HISTORIES, now)
        reply = await gw.stub.Audience(audience("i3", k=4, request_id="aud-1"))
        assert reply.request_id == "aud-1" and reply.model_version == METADATA["model_version"]
        assert reply.users_scanned == 4
        ids = [u.user_id for u in reply.users]
        assert ids[0] == "action-fan" and ids[-1] == "drama-fan"
        # expected = activity x probability, best first; activity = the stored events read
        events = {u.user_id: u.history_events for u in reply.users}
        assert events == {"action-fan": 3, "drama-fan": 3, "mixed": 2, "action-light": 1}
        for user in reply.users:
            assert user.expected_interactions == pytest.approx(
                user.probability * user.history_events, rel=1e-6
            )
            assert 0 < user.probability < 1
        assert [u.expected_interactions for u in reply.users] == sorted(
            (u.expected_interactions for u in reply.users), reverse=True
        )
        assert reply.expected_interactions == pytest.approx(
            sum(u.expected_interactions for u in reply.users), rel=1e-6
        )
        # k bounds the answer; the sum is over every user scanned all the same
        top1 = await gw.stub.Audience(audience("i3", k=1))
        assert [u.user_id for u in top1.users] == ["action-fan"]
        assert top1.expected_interactions == pytest.approx(reply.expected_interactions, rel=1e-6)
        # the drama fan is the drama item's best user
        drama = await gw.stub.Audience(audience("i6", k=1))
        assert [u.user_id for u in drama.users] == ["drama-fan"]


@run_async
async def test_forecast_demand_is_the_audience_sum_per_item_in_request_order(
    repository: Path,
) -> None:
    now = int(time.time())
    async with running_gateway(repository, FakeTransport()) as gw:
        await clicks(gw, HISTORIES, now)
        reply = await gw.stub.ForecastDemand(forecast("i6", "i3", "i1", request_id="f-1"))
        assert [i.item_id for i in reply.items] == ["i6", "i3", "i1"]
        assert reply.users_scanned == 4 and reply.request_id == "f-1"
        for item in reply.items:
            single = await gw.stub.Audience(audience(item.item_id, k=1))
            assert item.expected_interactions == pytest.approx(
                single.expected_interactions, rel=1e-6
            )
        demand = {i.item_id: i.expected_interactions for i in reply.items}
        assert demand["i3"] > demand["i6"]  # more of the users' activity is on action items
        # max_users scans the most recently active users only
        recent = await gw.stub.ForecastDemand(forecast("i3", max_users=1))
        assert recent.users_scanned == 1
        alone = await gw.stub.Audience(audience("i3", max_users=1))
        assert [u.user_id for u in alone.users] == ["action-light"]  # the last to click


@run_async
async def test_a_new_item_finds_its_audience_and_forget_user_leaves_it_at_once(
    repository: Path,
) -> None:
    now = int(time.time())
    async with running_gateway(repository, FakeTransport()) as gw:
        await clicks(gw, HISTORIES, now)
        new = recommender_pb2.Item(item_id="new-film", title="toy space")
        await gw.stub.UpsertItems(recommender_pb2.UpsertItemsRequest(items=[new]))
        reply = await gw.stub.Audience(audience("new-film", k=10))
        assert reply.users_scanned == 4 and len(reply.users) == 4
        assert "drama-fan" in [u.user_id for u in reply.users]
        forgotten = await gw.stub.ForgetUser(recommender_pb2.ForgetUserRequest(user_id="drama-fan"))
        assert forgotten.history_events_removed == 3
        after = await gw.stub.Audience(audience("new-film", k=10))
        assert after.users_scanned == 3
        assert "drama-fan" not in [u.user_id for u in after.users]
        demand = await gw.stub.ForecastDemand(forecast("new-film", "i6"))
        assert demand.users_scanned == 3
        # the other users' figures are the same as before, the forgotten one's share is gone
        before = {u.user_id: u.expected_interactions for u in reply.users}
        for user in after.users:
            assert user.expected_interactions == pytest.approx(before[user.user_id], rel=1e-6)


@run_async
async def test_user_vectors_are_cached_until_the_history_or_its_catalogue_rows_change(
    repository: Path,
) -> None:
    now = int(time.time())
    fake = FakeTransport()
    cache = "ltrec_gateway_audience_user_vectors_total"
    hits, misses = sample(cache, {"source": "cache"}), sample(cache, {"source": "encoded"})
    async with running_gateway(repository, fake) as gw:
        await clicks(gw, HISTORIES, now)
        await gw.stub.Audience(audience("i3"))
        assert encoded_users(fake) == 4
        await gw.stub.Audience(audience("i4"))
        await gw.stub.ForecastDemand(forecast("i1", "i2"))
        assert encoded_users(fake) == 4  # all cached
        # a click re-encodes that user only
        await gw.stub.Feedback(recommender_pb2.FeedbackRequest(event=click("mixed", "i5", now)))
        first = await gw.stub.Audience(audience("i3"))
        assert encoded_users(fake) == 5
        # an added item nobody's history holds re-encodes nobody
        new = recommender_pb2.Item(item_id="unseen", title="space")
        await gw.stub.UpsertItems(recommender_pb2.UpsertItemsRequest(items=[new]))
        await gw.stub.Audience(audience("i3"))
        assert encoded_users(fake) == 5
        # a click on an id the catalogue does not know yet: once it is added, that user's
        # history reads it, and the user is encoded again; so after it changes
        await gw.stub.Feedback(
            recommender_pb2.FeedbackRequest(event=click("action-light", "later-item", now))
        )
        await gw.stub.Audience(audience("i3"))
        assert encoded_users(fake) == 6
        later = recommender_pb2.Item(item_id="later-item", title="toy")
        await gw.stub.UpsertItems(recommender_pb2.UpsertItemsRequest(items=[later]))
        await gw.stub.Audience(audience("i3"))
        assert encoded_users(fake) == 7
        later.title = "toy toy space"  # another vector (the fake encoder reads the tokens)
        await gw.stub.UpsertItems(recommender_pb2.UpsertItemsRequest(items=[later]))
        reply = await gw.stub.Audience(audience("i3"))
        assert encoded_users(fake) == 8
        last = [c for c in fake.calls if c.model_name == contract.USER_ENCODER_MODEL][-1]
        # later-item (overlay row 8) is the only added item read: sent as the first overlay row
        assert last.inputs[contract.HISTORY_ITEMS][0, -1] == 7
        assert last.inputs[contract.EXTRA_ITEM_VECTORS].shape == (1, 1, 4)
        # a deleted trained item re-encodes the users who read it
        await gw.stub.DeleteItems(recommender_pb2.DeleteItemsRequest(item_ids=["i6"]))
        await gw.stub.Audience(audience("i3"))
        assert encoded_users(fake) == 9  # the drama fan
        assert len(reply.users) == len(first.users) == 4
    assert sample(cache, {"source": "encoded"}) == misses + 9
    assert sample(cache, {"source": "cache"}) == hits + 9 * 4 - 9


@run_async
async def test_users_without_a_catalogue_item_are_left_out_and_counted(repository: Path) -> None:
    now = int(time.time())
    skipped = "ltrec_gateway_audience_skipped_users_total"
    before = sample(skipped, {"reason": "no_known_items"})
    async with running_gateway(repository, FakeTransport()) as gw:
        await clicks(gw, {"unknown-only": ["x1", "x2"], "known": ["i1"]}, now)
        reply = await gw.stub.Audience(audience("i1"))
        assert [u.user_id for u in reply.users] == ["known"] and reply.users_scanned == 1
    assert sample(skipped, {"reason": "no_known_items"}) == before + 1


@run_async
async def test_an_empty_store_gives_an_empty_audience(repository: Path) -> None:
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        reply = await gw.stub.Audience(audience("i1"))
        assert (reply.users_scanned, len(reply.users), reply.expected_interactions) == (0, 0, 0.0)
        demand = await gw.stub.ForecastDemand(forecast("i1", "i2"))
        assert [i.expected_interactions for i in demand.items] == [0.0, 0.0]
    assert not [c for c in fake.calls if c.model_name == contract.AUDIENCE_MODEL]


@run_async
async def test_users_in_blocks_merge_to_the_one_call_answer(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With blocks of 2 users (4 calls for 7 users), the same users, figures and order."""
    now = int(time.time())
    histories = {f"user-{n}": (ACTION if n % 2 else DRAMA)[: 1 + n % 2] for n in range(7)}
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        await clicks(gw, histories, now)
        whole = await gw.stub.Audience(audience("i2", k=5))
        demand = await gw.stub.ForecastDemand(forecast("i2", "i5"))
        monkeypatch.setattr(server.audience, "BLOCK_SCORES", 2 * 7)  # 7 = the catalogue + 1
        calls = len(fake.ranking_calls(contract.AUDIENCE_MODEL))
        blocked = await gw.stub.Audience(audience("i2", k=5))
        assert len(fake.ranking_calls(contract.AUDIENCE_MODEL)) - calls == 4
        blocked_demand = await gw.stub.ForecastDemand(forecast("i2", "i5"))
    assert [u.user_id for u in blocked.users] == [u.user_id for u in whole.users]
    np.testing.assert_allclose(
        [u.expected_interactions for u in blocked.users],
        [u.expected_interactions for u in whole.users],
        rtol=1e-6,
    )
    assert blocked.expected_interactions == pytest.approx(whole.expected_interactions, rel=1e-6)
    np.testing.assert_allclose(
        [i.expected_interactions for i in blocked_demand.items],
        [i.expected_interactions for i in demand.items],
        rtol=1e-6,
    )


@run_async
async def test_what_triton_is_sent(repository: Path) -> None:
    """The overlay, the hidden items (left out of the softmax), the request's context for every
    user, each user's activity, k at most the users."""
    now = int(time.time())
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        await clicks(gw, HISTORIES, now)
        await gw.stub.UpsertItems(
            recommender_pb2.UpsertItemsRequest(
                items=[recommender_pb2.Item(item_id="i2", title="toy")]
            )
        )
        context = recommender_pb2.Context(timestamp=1_704_295_800, device="mobile", region="zip1")
        await gw.stub.Audience(audience("i2", k=50, context=context))
    call = fake.ranking_calls(contract.AUDIENCE_MODEL)[-1]
    assert call.inputs[contract.QUERY_ITEMS].tolist() == [[7]]  # i2 is now the overlay's row
    # the replaced trained row, padded
    assert call.inputs[contract.EXCLUDE_ITEMS].tolist() == [[2] + [0] * 15]
    assert call.inputs[contract.EXTRA_ITEM_VECTORS].shape == (1, 4)  # the added i2
    # the item lookup's overlay: per query row, the rows it reads
    assert call.inputs[contract.QUERY_EXTRA_ITEM_VECTORS].shape == (1, 1, 4)
    # Wednesday 15:30 UTC: hour bucket 16, weekday bucket 3; device 2, region 2
    assert call.inputs[contract.CONTEXT].tolist() == [[16, 3, 2, 2]] * 4
    assert sorted(call.inputs[contract.USER_ACTIVITY].tolist()) == [1.0, 2.0, 3.0, 3.0]
    assert call.inputs[contract.TOP_K].tolist() == [4]


ERRORS = [
    (audience("i1", k=0), "k must be in [1, 1000], got 0"),
    (audience("i1", k=1001), "k must be in [1, 1000], got 1001"),
    (audience("", k=1), "item_id must be non-empty"),
    (audience("x" * 257, k=1), "item_id must be at most 256 characters, got 257"),
    (audience("i1", max_users=0), "max_users must be in [1, 10000], got 0"),
    (audience("i1", max_users=10_001), "max_users must be in [1, 10000], got 10001"),
    (audience("i1", request_id="é"), "request_id must contain printable ASCII characters only"),
    (audience("i1", model_version="v" * 129), "model_version must be at most 128 characters"),
    (
        audience("i1", context=recommender_pb2.Context(device="d" * 65)),
        "context.device must be at most 64 characters, got 65",
    ),
    (forecast(), "item_ids must have between 1 and 100 ids, got 0"),
    (forecast(*[f"i{n}" for n in range(101)]), "item_ids must have between 1 and 100 ids, got 101"),
    (forecast("i1", ""), "item_ids[1] must be non-empty"),
    (forecast("i1", "i2", "i1"), "item_ids[2] repeats item_ids[0] (ids must be distinct)"),
    (forecast("i1", max_users=-1), "max_users must be in [1, 10000], got -1"),
]


@pytest.mark.parametrize(("request_", "message"), ERRORS)
@run_async
async def test_out_of_bounds_requests_name_the_field_and_bound(
    repository: Path, request_: Any, message: str
) -> None:
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        call = (
            gw.stub.Audience
            if isinstance(request_, recommender_pb2.AudienceRequest)
            else (gw.stub.ForecastDemand)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(message), caught.value.details()
    assert not fake.calls  # nothing reached Triton


@run_async
async def test_unknown_items_and_versions_are_not_found(repository: Path) -> None:
    async with running_gateway(repository, FakeTransport()) as gw:
        await gw.stub.DeleteItems(recommender_pb2.DeleteItemsRequest(item_ids=["i5"]))
        for call, request, message in (
            (gw.stub.Audience, audience("nope"), "item_id 'nope' is not in the catalogue"),
            (gw.stub.Audience, audience("i5"), "item_id 'i5' is not in the catalogue"),
            (gw.stub.ForecastDemand, forecast("i1", "nope"), "item_ids[1] 'nope' is not in the"),
            (gw.stub.Audience, audience("i1", model_version="v0"), "model_version 'v0' is not"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert (caught.value.details() or "").startswith(message)


@run_async
async def test_no_history_store_or_no_audience_model_is_unavailable(
    repository: Path, tmp_path: Path
) -> None:
    async with running_gateway(repository, FakeTransport(), history_store="off") as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Audience(audience("i1"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "keeps no user history (LTREC_HISTORY_STORE=off)" in (caught.value.details() or "")

    import json

    from ltrec_core.contract import METADATA_FILE

    metadata = json.loads((repository / METADATA_FILE).read_text())
    metadata.pop("audience")
    (repository / METADATA_FILE).write_text(json.dumps(metadata))
    async with running_gateway(repository, FakeTransport()) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.ForecastDemand(forecast("i1"))
        # everything else is served as before
        assert (await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1))).items
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no audience model" in (caught.value.details() or "")


@run_async
async def test_triton_down_is_unavailable_and_a_timeout_deadline_exceeded(
    repository: Path,
) -> None:
    from tests.support.gateway import unavailable

    now = int(time.time())
    fake = FakeTransport()
    async with running_gateway(repository, fake, triton_retries=0) as gw:
        await clicks(gw, HISTORIES, now)
        fake.errors = [unavailable()]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Audience(audience("i1"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        fake.delay_seconds = 0.5
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Audience(audience("i1"), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        fake.delay_seconds = 0.0
        assert len((await gw.stub.Audience(audience("i1"))).users) == 4


@run_async
async def test_metrics_and_log_lines_carry_no_user_or_item_id(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = int(time.time())
    ok = {"method": "Audience", "code": "OK"}
    before = sample("ltrec_gateway_requests_total", ok)
    scanned = sample("ltrec_gateway_audience_scanned_users_sum", {"method": "ForecastDemand"})
    caplog.set_level(logging.DEBUG)
    async with running_gateway(repository, FakeTransport()) as gw:
        await clicks(gw, HISTORIES, now)
        await gw.stub.Audience(audience("i3"))
        await gw.stub.ForecastDemand(forecast("i3", "i4"))
    assert sample("ltrec_gateway_requests_total", ok) == before + 1
    assert (
        sample("ltrec_gateway_audience_scanned_users_sum", {"method": "ForecastDemand"})
        == scanned + 4
    )
    lines = [
        line for line in access_log(caplog) if line["method"] in ("Audience", "ForecastDemand")
    ]
    assert [line["method"] for line in lines] == ["Audience", "ForecastDemand"]
    assert all(line["user"] == "" and line["code"] == "OK" for line in lines)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert not [user for user in HISTORIES if user in text]
    exposition = generate_latest().decode()
    assert not [user for user in HISTORIES if user in exposition]


@run_async
async def test_the_example_client_prints_an_audience_and_a_forecast(repository: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    now = int(time.time())
    async with running_gateway(repository, FakeTransport()) as gw:
        await clicks(gw, HISTORIES, now)
        outputs = []
        for command in (["audience", "i3", "-k", "2"], ["forecast", "i3", "i6"]):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "examples/items_client.py", "--address", gw.address, *command,
                cwd=root, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(process.communicate(), timeout=20)
            assert process.returncode == 0, err.decode()
            outputs.append(out.decode().splitlines())
    audience_lines, forecast_lines = outputs
    assert (
        audience_lines[0].startswith("audience of i3 (model ")
        and "2 of 4 users" in (audience_lines[0])
    )
    assert audience_lines[1].startswith("  1. action-fan  ") and "x 3 events)" in audience_lines[1]
    assert len(audience_lines) == 3
    assert forecast_lines[0] == f"demand over 4 users (model {METADATA['model_version']}):"
    assert [line.split()[-1] for line in forecast_lines[1:]] == ["i3", "i6"]


@run_async
async def test_a_user_forgotten_while_their_vector_is_encoded_is_left_out(
    repository: Path,
) -> None:
    """ForgetUser lands while an Audience waits for the user encoder: the answer leaves the
    user out (though listed before), and no vector of theirs stays cached."""
    now = int(time.time())
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        await clicks(gw, HISTORIES, now)
        fake.delay_seconds = 0.5
        pending = asyncio.ensure_future(gw.stub.Audience(audience("i6")))
        await asyncio.sleep(0.2)
        await gw.stub.ForgetUser(recommender_pb2.ForgetUserRequest(user_id="drama-fan"))
        reply = await pending
        assert "drama-fan" not in [u.user_id for u in reply.users] and len(reply.users) == 3
        fake.delay_seconds = 0.0
        again = await gw.stub.Audience(audience("i6"))
        assert again.users_scanned == 3
    assert sample("ltrec_gateway_audience_cached_users") == 3
