"""The gateway end to end in-process: the real grpc.aio server against a fake Triton transport."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from ltrec_core import contract
from server.gen.ltrec.v1 import recommender_pb2
from server.interceptors import INTERNAL_MESSAGE, REQUEST_ID_METADATA_KEY, user_hash
from tests.support.gateway import (
    DIM,
    ITEMS,
    METADATA,
    FakeTransport,
    access_log,
    event,
    full_request,
    outputs,
    run_async,
    running_gateway,
    unavailable,
    write_repository,
)

SERVICE = "ltrec.v1.Recommender"
NEG_INF = float("-inf")


# --- The happy path ----------------------------------------------------------------------------


@run_async
async def test_recommend_maps_the_ranking_and_sends_the_expected_tensors(repository: Path) -> None:
    fake = FakeTransport(
        # i2 is in the history: the scorer should have removed it, the gateway drops it anyway.
        outputs([5, 4, 2, 0, 0, 0], [1.5, 0.5, 0.25, NEG_INF, NEG_INF, NEG_INF], [1, 0, 1, 0, 0, 0])
    )
    async with running_gateway(repository, fake) as gw:
        call = gw.stub.Recommend(full_request(), timeout=5)
        response = await call
        trailing = dict(await call.trailing_metadata())

    assert [item.item_id for item in response.items] == ["i5", "i4"]
    assert [item.title for item in response.items] == ["Nixon, Part 2 (1995)", "Sabrina (1995)"]
    assert [item.score for item in response.items] == [1.5, 0.5]
    assert [item.long_tail for item in response.items] == [True, True]
    # Reason positions index the history sent: [i2 (view), i3 (cart), i1 (purchase)].
    assert [item.reason for item in response.items] == [
        'Because you added to cart "Casino (1995)"',
        'Because you viewed "Heat, "The" (1995)"',
    ]
    assert response.model_version == "20261129-ab12cd"
    assert response.request_id == "req-123"
    assert trailing[REQUEST_ID_METADATA_KEY] == "req-123"
    assert response.skipped_history_items == 1

    (sent,) = fake.calls
    assert sent.model_name == contract.ENSEMBLE_MODEL
    assert sent.request_id == "req-123"
    tensors = sent.inputs
    assert set(tensors) == {
        contract.HISTORY_ITEMS,
        contract.HISTORY_EVENT_TYPES,
        contract.CONTEXT,
        contract.EXCLUDE_ITEMS,
        contract.LONG_TAIL_WEIGHT,
        contract.TOP_K,
        contract.EXTRA_ITEM_VECTORS,
        contract.EXTRA_POPULARITY,
        contract.ITEM_ELIGIBLE,
    }
    # Sorted by time (stable), unknown id dropped, then the last max_history=3 known events.
    np.testing.assert_array_equal(tensors[contract.HISTORY_ITEMS], [[2, 3, 1]])
    # UNSPECIFIED -> view (1), cart (2), purchase (3).
    np.testing.assert_array_equal(tensors[contract.HISTORY_EVENT_TYPES], [[1, 2, 3]])
    # 15:xx UTC -> 16; Wednesday (Monday = 0) -> 3; " Mobile " -> mobile -> 2; unknown region -> 0.
    np.testing.assert_array_equal(tensors[contract.CONTEXT], [[16, 3, 2, 0]])
    # Padded to the first exclusion bucket, so that requests of one shape batch in Triton.
    np.testing.assert_array_equal(
        tensors[contract.EXCLUDE_ITEMS], [[6] + [0] * (contract.EXCLUDE_BUCKET_MIN - 1)]
    )
    np.testing.assert_array_equal(tensors[contract.LONG_TAIL_WEIGHT], [[0.25]])
    np.testing.assert_array_equal(tensors[contract.TOP_K], [[6]])  # min(k=10, N=6), per row
    # No items added after training: an empty overlay of the model's width, per row.
    assert tensors[contract.EXTRA_ITEM_VECTORS].shape == (1, 0, DIM)
    assert tensors[contract.EXTRA_POPULARITY].shape == (1, 0)
    # No filter: one True that the scorer broadcasts over the catalogue.
    np.testing.assert_array_equal(tensors[contract.ITEM_ELIGIBLE], [[True]])
    expected_dtypes = {
        contract.HISTORY_ITEMS: np.int64,
        contract.HISTORY_EVENT_TYPES: np.int64,
        contract.CONTEXT: np.int64,
        contract.EXCLUDE_ITEMS: np.int64,
        contract.LONG_TAIL_WEIGHT: np.float32,
        contract.TOP_K: np.int64,
        contract.EXTRA_ITEM_VECTORS: np.float32,
        contract.EXTRA_POPULARITY: np.float32,
        contract.ITEM_ELIGIBLE: np.bool_,
    }
    assert {name: array.dtype.type for name, array in tensors.items()} == expected_dtypes


@run_async
async def test_served_items_are_counted_by_long_tail_flag(repository: Path) -> None:
    """The long-tail share of what callers are shown (per model version on the dashboard)."""

    def served(flag: str) -> float:
        value = REGISTRY.get_sample_value(
            "ltrec_gateway_served_items_total", {"method": "Recommend", "long_tail": flag}
        )
        return value or 0.0

    before = served("true"), served("false")
    # i5 and i4 are long-tail items, i1 and i3 are not; i2 is in the history and dropped.
    fake = FakeTransport(outputs([5, 1, 4, 3, 2], [5.0, 4.0, 3.0, 2.0, 1.0], [0, 0, 0, 0, 0]))
    async with running_gateway(repository, fake) as gw:
        request = recommender_pb2.RecommendRequest(
            history=[event("i2", recommender_pb2.EVENT_TYPE_VIEW, 100)], k=10
        )
        response = await gw.stub.Recommend(request, timeout=5)
    assert [item.long_tail for item in response.items] == [True, False, True, False]
    assert (served("true") - before[0], served("false") - before[1]) == (2, 2)


@run_async
async def test_recommend_without_history_pads_and_uses_generic_reasons(repository: Path) -> None:
    fake = FakeTransport(outputs([4, 1], [0.9, 0.8], [0, 0]))
    request = recommender_pb2.RecommendRequest(
        k=2, long_tail_weight=1.5, history=[event("gone", recommender_pb2.EVENT_TYPE_VIEW, 1)]
    )
    async with running_gateway(repository, fake) as gw:
        before = dt.datetime.now(dt.UTC)
        response = await gw.stub.Recommend(request, timeout=5)
        after = dt.datetime.now(dt.UTC)

    assert [(i.item_id, i.reason) for i in response.items] == [
        ("i4", "A long-tail pick"),
        ("i1", "Popular right now"),
    ]
    assert response.skipped_history_items == 1
    assert len(response.request_id) == 32 and int(response.request_id, 16) >= 0
    tensors = fake.calls[0].inputs
    # All padding, of the smallest length (max_history=3 here); no exclusions: all padding too.
    np.testing.assert_array_equal(tensors[contract.HISTORY_ITEMS], [[0, 0, 0]])
    np.testing.assert_array_equal(tensors[contract.HISTORY_EVENT_TYPES], [[0, 0, 0]])
    np.testing.assert_array_equal(
        tensors[contract.EXCLUDE_ITEMS], np.zeros((1, contract.EXCLUDE_BUCKET_MIN))
    )
    np.testing.assert_array_equal(tensors[contract.LONG_TAIL_WEIGHT], [[1.5]])
    np.testing.assert_array_equal(tensors[contract.TOP_K], [[2]])
    hour, weekday, device, region = tensors[contract.CONTEXT][0].tolist()
    assert (hour, weekday) in {
        (1 + moment.hour, 1 + moment.weekday()) for moment in (before, after)
    }  # timestamp 0 means now
    assert (device, region) == (contract.UNKNOWN_BUCKET, contract.UNKNOWN_BUCKET)


@run_async
async def test_history_is_truncated_to_the_last_max_history_known_items(repository: Path) -> None:
    fake = FakeTransport()
    history = [event(f"i{n}", recommender_pb2.EVENT_TYPE_VIEW, 0) for n in (6, 5, 4, 3, 2, 1)]
    async with running_gateway(repository, fake) as gw:
        await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1, history=history), timeout=5)
    np.testing.assert_array_equal(fake.calls[0].inputs[contract.HISTORY_ITEMS], [[3, 2, 1]])


@run_async
async def test_out_of_range_index_from_the_model_is_internal(repository: Path) -> None:
    fake = FakeTransport(outputs([99], [1.0], [0]))
    async with running_gateway(repository, fake) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == INTERNAL_MESSAGE


# --- Validation ----------------------------------------------------------------------------------


def _set(**fields: Any) -> Callable[[recommender_pb2.RecommendRequest], None]:
    def mutate(request: recommender_pb2.RecommendRequest) -> None:
        for name, value in fields.items():
            if isinstance(value, list):
                del getattr(request, name)[:]
                getattr(request, name).extend(value)
            else:
                setattr(request, name, value)

    return mutate


def _context(**fields: Any) -> Callable[[recommender_pb2.RecommendRequest], None]:
    def mutate(request: recommender_pb2.RecommendRequest) -> None:
        for name, value in fields.items():
            setattr(request.context, name, value)

    return mutate


VIEW = recommender_pb2.EVENT_TYPE_VIEW
VALIDATION_CASES = {
    "k zero": (_set(k=0), "k must be in [1, 500], got 0"),
    "k above max": (_set(k=501), "k must be in [1, 500], got 501"),
    "user_id too long": (_set(user_id="u" * 257), "user_id must be at most 256 characters"),
    "history too long": (
        _set(history=[event("i1", VIEW, 1)] * 1001),
        "history must have at most 1000 events, got 1001",
    ),
    "empty history id": (
        _set(history=[event("i1", VIEW, 1), event("", VIEW, 1)]),
        "history[1].item_id must be non-empty",
    ),
    "history id too long": (
        _set(history=[event("x" * 257, VIEW, 1)]),
        "history[0].item_id must be at most 256 characters",
    ),
    "undefined event type": (
        _set(history=[event("i1", 9, 1)]),
        "history[0].event_type must be a defined EventType, got 9",
    ),
    "negative history timestamp": (
        _set(history=[event("i1", VIEW, -1)]),
        "history[0].timestamp must be in [0, ",
    ),
    "too many exclusions": (
        _set(exclude_item_ids=["i1"] * 1001),
        "exclude_item_ids must have at most 1000 ids, got 1001",
    ),
    "empty exclusion": (_set(exclude_item_ids=[""]), "exclude_item_ids[0] must be non-empty"),
    "weight above max": (_set(long_tail_weight=3.5), "long_tail_weight must be in [0, 2], got 3.5"),
    "negative weight": (
        _set(long_tail_weight=-0.5),
        "long_tail_weight must be in [0, 2], got -0.5",
    ),
    "nan weight": (_set(long_tail_weight=math.nan), "long_tail_weight must be in [0, 2], got nan"),
    "request_id too long": (
        _set(request_id="r" * 129),
        "request_id must be at most 128 characters",
    ),
    "request_id unprintable": (_set(request_id="a\nb"), "request_id must contain printable"),
    "device too long": (_context(device="d" * 65), "context.device must be at most 64 characters"),
    "region too long": (_context(region="r" * 65), "context.region must be at most 64 characters"),
    "negative context timestamp": (_context(timestamp=-5), "context.timestamp must be in [0, "),
}


@pytest.mark.parametrize("case", VALIDATION_CASES.values(), ids=VALIDATION_CASES.keys())
@run_async
async def test_invalid_requests_name_the_field_and_bound(
    repository: Path, case: tuple[Callable[[recommender_pb2.RecommendRequest], None], str]
) -> None:
    mutate, expected = case
    request = recommender_pb2.RecommendRequest(k=5, history=[event("i1", VIEW, 1)])
    mutate(request)
    fake = FakeTransport()
    async with running_gateway(repository, fake) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (caught.value.details() or "")
    assert fake.calls == []
    # Errors carry a request id too, so that callers can quote it.
    assert REQUEST_ID_METADATA_KEY in dict(caught.value.trailing_metadata() or ())


# --- Backend failures ----------------------------------------------------------------------------


@run_async
async def test_unavailable_triton_gives_unavailable(repository: Path) -> None:
    """The gateway does not retry by itself: gRPC's retry policy in the Triton channel does
    (tests/unit/test_triton_channel.py), so the transport is called once."""
    fake = FakeTransport()
    fake.always = unavailable()
    async with running_gateway(repository, fake, triton_retries=2) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake.calls) == 1


@run_async
async def test_connection_errors_count_as_unavailable(repository: Path) -> None:
    fake = FakeTransport(outputs([3], [1.0], [0]))
    fake.errors = [ConnectionRefusedError("refused")]
    async with running_gateway(repository, fake, triton_retries=2) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
        response = await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [item.item_id for item in response.items] == ["i3"]
    assert len(fake.calls) == 2


@run_async
async def test_slow_triton_gives_deadline_exceeded_within_the_callers_deadline(
    repository: Path,
) -> None:
    fake = FakeTransport()
    fake.delay_seconds = 10
    async with running_gateway(repository, fake, triton_timeout_seconds=5.0) as gw:
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=0.3)
        elapsed = time.monotonic() - start
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 3.0  # far below the fake's 10 s: the deadline, not the backend, ended it
    (sent,) = fake.calls
    # The caller's remaining deadline, not the 5 s config. gRPC carries the deadline as a
    # rounded timeout header, so the server's view may exceed 0.3 s by a few milliseconds.
    assert 0 < sent.client_timeout <= 0.3 + 0.05


@run_async
async def test_configured_triton_timeout_gives_deadline_exceeded(repository: Path) -> None:
    fake = FakeTransport()
    fake.delay_seconds = 10
    async with running_gateway(repository, fake, triton_timeout_seconds=0.2) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
    # The gateway, not the caller's channel, ended the call.
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timed out" in (caught.value.details() or "")
    assert fake.calls[0].client_timeout == pytest.approx(0.2)


@run_async
async def test_triton_deadline_status_maps_to_deadline_exceeded(repository: Path) -> None:
    fake = FakeTransport()
    fake.always = InferenceServerException("slow", status="StatusCode.DEADLINE_EXCEEDED")
    async with running_gateway(repository, fake) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(fake.calls) == 1  # only UNAVAILABLE is retried


@run_async
async def test_backend_errors_are_internal_never_invalid_argument(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeTransport()
    fake.always = InferenceServerException("bad shape", status="StatusCode.INVALID_ARGUMENT")
    async with running_gateway(repository, fake) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == INTERNAL_MESSAGE
    assert len(fake.calls) == 1
    assert "bad shape" in caplog.text


@run_async
async def test_unexpected_exception_is_internal_with_a_generic_message(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeTransport()
    fake.always = RuntimeError("secret detail")
    caplog.set_level(logging.INFO)
    async with running_gateway(repository, fake) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(
                recommender_pb2.RecommendRequest(user_id="user-secret", k=1, request_id="r-9"),
                timeout=5,
            )
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == INTERNAL_MESSAGE
    assert "secret detail" in caplog.text and "Traceback" in caplog.text
    (line,) = access_log(caplog)
    assert line["request_id"] == "r-9" and line["method"] == "Recommend"
    assert line["code"] == "INTERNAL" and line["model_version"] == METADATA["model_version"]
    assert len(line["user"]) == 16  # a keyed hash (random key when none is configured)
    assert "user-secret" not in caplog.text


# --- Health, reflection, metrics, lifecycle ------------------------------------------------------


async def _wait_for_status(
    stub: health_pb2_grpc.HealthStub, service: str, status: int, timeout: float = 3.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        if response.status == status:
            return
        assert time.monotonic() < deadline, f"{service!r} stayed {response.status}"
        await asyncio.sleep(0.01)


@run_async
async def test_health_follows_triton_readiness_both_ways(repository: Path) -> None:
    fake = FakeTransport()
    fake.ready = False
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    async with running_gateway(repository, fake) as gw:
        health = health_pb2_grpc.HealthStub(gw.channel)
        for service in ("", SERVICE):
            check = health_pb2.HealthCheckRequest(service=service)
            assert (await health.Check(check, timeout=1)).status == not_serving
        fake.ready = True
        for service in ("", SERVICE):
            await _wait_for_status(health, service, serving)
        fake.ready = False
        for service in ("", SERVICE):
            await _wait_for_status(health, service, not_serving)
        fake.ready = True
        await _wait_for_status(health, SERVICE, serving)
        await gw.server.stop(1.0)
        assert fake.closed
        assert REGISTRY.get_sample_value("ltrec_gateway_triton_ready") == 0


def _identity_repository(directory: Path, content_hash: str) -> Path:
    repository = write_repository(directory)
    metadata = {**METADATA, "content_hash": content_hash}
    (repository / contract.METADATA_FILE).write_text(json.dumps(metadata), encoding="utf-8")
    return repository


def _served(version: str, content_hash: str) -> dict[str, str]:
    return {
        contract.MODEL_VERSION_PARAMETER: version,
        contract.CONTENT_HASH_PARAMETER: content_hash,
    }


@run_async
async def test_health_is_not_serving_while_triton_serves_another_model(tmp_path: Path) -> None:
    """Ready is not enough: the version and content hash of Triton's ensemble must be the
    repository's the gateway loaded, re-checked every poll, both ways."""
    repository = _identity_repository(tmp_path / "repo", "a" * 64)
    fake = FakeTransport()
    fake.parameters = _served("older-version", "b" * 64)
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    mismatch = "ltrec_gateway_model_version_mismatch"
    async with running_gateway(repository, fake) as gw:
        health = health_pb2_grpc.HealthStub(gw.channel)
        await asyncio.sleep(0.1)  # several polls
        for service in ("", SERVICE):
            check = health_pb2.HealthCheckRequest(service=service)
            assert (await health.Check(check, timeout=1)).status == not_serving
        assert REGISTRY.get_sample_value(mismatch) == 1
        assert REGISTRY.get_sample_value("ltrec_gateway_triton_ready") == 1
        fake.parameters = _served(METADATA["model_version"], "a" * 64)
        await _wait_for_status(health, SERVICE, serving)
        assert REGISTRY.get_sample_value(mismatch) == 0
        # Same version label, other files (a re-export): not the model this gateway loaded.
        fake.parameters = _served(METADATA["model_version"], "c" * 64)
        await _wait_for_status(health, "", not_serving)
        assert REGISTRY.get_sample_value(mismatch) == 1
        fake.parameters = {}  # a repository exported without an identity
        await asyncio.sleep(0.1)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=1)).status == (
            not_serving
        )
        fake.parameters = _served(METADATA["model_version"], "a" * 64)
        await _wait_for_status(health, "", serving)


@run_async
async def test_health_skips_the_comparison_for_a_repository_without_content_hash(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Repositories exported before the hash existed still serve (and the start says so)."""
    fake = FakeTransport()
    fake.parameters = _served("anything", "b" * 64)
    async with running_gateway(repository, fake) as gw:
        health = health_pb2_grpc.HealthStub(gw.channel)
        await _wait_for_status(health, SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert REGISTRY.get_sample_value("ltrec_gateway_model_version_mismatch") == 0
    assert any("no content_hash" in r.getMessage() for r in caplog.records)


@run_async
async def test_reflection_lists_the_services(repository: Path) -> None:
    async with running_gateway(repository, FakeTransport()) as gw:
        stub = reflection_pb2_grpc.ServerReflectionStub(gw.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@run_async
async def test_metrics_count_requests_by_code(repository: Path) -> None:
    ok = {"method": "Recommend", "code": "OK"}
    invalid = {"method": "Recommend", "code": "INVALID_ARGUMENT"}
    before_ok = _sample("ltrec_gateway_requests_total", **ok)
    before_invalid = _sample("ltrec_gateway_requests_total", **invalid)
    before_seconds = _sample("ltrec_gateway_request_duration_seconds_count", **ok)
    before_skipped = _sample("ltrec_gateway_skipped_history_items_total")
    before_triton = _sample("ltrec_gateway_stage_duration_seconds_count", stage="triton")
    async with running_gateway(repository, FakeTransport()) as gw:
        await gw.stub.Recommend(full_request(), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=0), timeout=5)
        health = health_pb2_grpc.HealthStub(gw.channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=1)  # not counted
    assert _sample("ltrec_gateway_requests_total", **ok) == before_ok + 1
    assert _sample("ltrec_gateway_requests_total", **invalid) == before_invalid + 1
    assert _sample("ltrec_gateway_request_duration_seconds_count", **ok) == before_seconds + 1
    assert _sample("ltrec_gateway_skipped_history_items_total") == before_skipped + 1
    assert (
        _sample("ltrec_gateway_stage_duration_seconds_count", stage="triton") == before_triton + 1
    )
    assert _sample("ltrec_gateway_requests_total", method="Check", code="OK") == 0
    assert _sample("ltrec_gateway_in_flight_requests") == 0
    assert _sample("ltrec_gateway_catalogue_items") == len(ITEMS)
    assert _sample("ltrec_gateway_model_info", model_version="20261129-ab12cd") == 1
    for family in REGISTRY.collect():
        for sample in family.samples:
            assert not {"user-42", "i1", "req-123"} & set(sample.labels.values())


@run_async
async def test_model_not_loaded_in_triton_gives_unavailable_without_retry(
    repository: Path,
) -> None:
    fake = FakeTransport()
    fake.always = InferenceServerException(
        "Request for unknown model: 'recommend' is not found", status="StatusCode.NOT_FOUND"
    )
    async with running_gateway(repository, fake, triton_retries=2) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake.calls) == 1


@run_async
async def test_access_log_is_json_with_a_keyed_user_hash(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.interceptors")
    fake = FakeTransport(outputs([3], [1.0], [0]))
    async with running_gateway(repository, fake, user_hash_key="k1") as gw:
        for user in ("alice@example.com", "alice@example.com", "bob"):
            await gw.stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=1), timeout=5)
    lines = access_log(caplog)
    assert [line["code"] for line in lines] == ["OK", "OK", "OK"]
    users = [line["user"] for line in lines]
    assert users[0] == users[1] == user_hash("alice@example.com", b"k1") != users[2]
    assert user_hash("alice@example.com", b"k2") != users[0]  # keyed: another key, another hash
    assert "alice" not in caplog.text and "bob" not in caplog.text


@run_async
async def test_overload_fails_fast_with_resource_exhausted(repository: Path) -> None:
    fake = FakeTransport()
    fake.delay_seconds = 1.0
    async with running_gateway(repository, fake, max_concurrent_rpcs=2) as gw:

        async def call() -> tuple[grpc.StatusCode, float]:
            started = time.monotonic()
            try:
                await gw.stub.Recommend(full_request(), timeout=5)
                return grpc.StatusCode.OK, time.monotonic() - started
            except grpc.aio.AioRpcError as exc:
                return exc.code(), time.monotonic() - started

        results = await asyncio.gather(*(call() for _ in range(6)))
    codes = [code for code, _ in results]
    assert codes.count(grpc.StatusCode.OK) == 2
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4
    # Shed at once, not queued behind the slow calls.
    assert all(s < 0.5 for code, s in results if code is grpc.StatusCode.RESOURCE_EXHAUSTED)


@run_async
async def test_oversized_messages_are_refused(repository: Path) -> None:
    async with running_gateway(repository, FakeTransport(), max_message_bytes=16_384) as gw:
        request = full_request()
        request.exclude_item_ids.extend(f"item-{n:0200d}" for n in range(100))  # ~20 KB
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (caught.value.details() or "")
        assert (await gw.stub.Recommend(full_request(), timeout=5)).request_id == "req-123"


@run_async
async def test_an_unserved_model_version_is_not_found(repository: Path) -> None:
    async with running_gateway(repository, FakeTransport()) as gw:
        pinned = full_request()
        pinned.model_version = METADATA["model_version"]
        assert (await gw.stub.Recommend(pinned)).model_version == METADATA["model_version"]
        pinned.model_version = "19990101-000000"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Recommend(pinned)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model_version '19990101-000000' is not served here (serving '20261129-ab12cd')" in (
            caught.value.details() or ""
        )
        assert len(gw.fake.calls) == 1


@run_async
async def test_shutdown_keeps_serving_through_the_drain_while_not_serving(
    repository: Path,
) -> None:
    async with running_gateway(
        repository, FakeTransport(), shutdown_drain_seconds=3.0, max_connection_age_seconds=0.2
    ) as gw:
        health = health_pb2_grpc.HealthStub(gw.channel)
        stopping = asyncio.create_task(gw.server.stop(5.0))
        await asyncio.sleep(0.2)
        status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Still answering during the drain, across aged-out connections (the channel reconnects).
        for _ in range(5):
            reply = await gw.stub.Recommend(full_request(), timeout=5, wait_for_ready=True)
            assert reply.request_id == "req-123"
            await asyncio.sleep(0.05)
        assert not stopping.done()
        await stopping


@run_async
async def test_bookkeeping_after_a_response_runs_in_the_next_turn_in_the_requests_context(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The access line, counters and served list of an answered RPC are recorded after the
    answer is handed to gRPC (the loop's next turn), in the RPC's context; a failure there is
    logged, never raised; without a running loop the work happens at once."""
    import contextvars

    from server.interceptors import after_response

    current: contextvars.ContextVar[str] = contextvars.ContextVar("current", default="none")
    seen: list[tuple[str, str]] = []
    current.set("rpc-1")
    after_response(lambda label: seen.append((label, current.get())), "deferred")
    current.set("rpc-2")  # the context as it was when the RPC asked stays the callback's
    assert seen == []
    await asyncio.sleep(0)
    assert seen == [("deferred", "rpc-1")]

    def fails() -> None:
        raise RuntimeError("bookkeeping broke")

    with caplog.at_level(logging.ERROR):
        after_response(fails)
        await asyncio.sleep(0)
    assert "bookkeeping after a response failed" in caplog.text
    await asyncio.to_thread(after_response, seen.append, ("no loop", "at once"))
    assert seen[-1] == ("no loop", "at once")
