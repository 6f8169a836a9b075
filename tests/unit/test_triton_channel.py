"""The gateway's Triton channel against fake Tritons over real gRPC: round_robin spreads calls
over every address of the target, and gRPC's retry policy (the service config) retries only
UNAVAILABLE, a bounded number of times, within the caller's deadline, on the next address."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from server.errors import BackendError, BackendTimeout, BackendUnavailable
from server.gen.ltrec.v1 import recommender_pb2
from server.triton_client import (
    GrpcTritonTransport,
    TritonClient,
    channel_args,
    infer_request,
    response_outputs,
    service_config,
    status_code,
)
from tests.support.fake_triton import FakeTriton, serving
from tests.support.gateway import run_async, running_gateway
from triton_local.server import free_ports

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
INPUTS = {"history_items": np.zeros((1, 3), dtype=np.int64)}


def client(target: str, *, retries: int, backoff_seconds: float = 0.01) -> TritonClient:
    transport = GrpcTritonTransport(target, retries=retries, backoff_seconds=backoff_seconds)
    return TritonClient(transport, timeout_seconds=5.0)


async def infer(triton: TritonClient, deadline_seconds: float = 5.0) -> dict[str, np.ndarray]:
    deadline = time.monotonic() + deadline_seconds
    return await triton.infer(INPUTS, deadline=deadline, request_id="r1")


def test_service_config_is_round_robin_with_a_bounded_unavailable_only_retry() -> None:
    config = service_config(retries=2, backoff_seconds=0.05)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "inference.GRPCInferenceService", "method": "ModelInfer"}]
    assert method["retryPolicy"] == {
        "maxAttempts": 3,
        "initialBackoff": "0.050000s",
        "maxBackoff": "1.000000s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    # No retries: no retry policy (gRPC requires maxAttempts >= 2), still round_robin.
    assert service_config(retries=0, backoff_seconds=0.05) == {
        "loadBalancingConfig": [{"round_robin": {}}]
    }
    args = dict(channel_args(retries=2, backoff_seconds=0.05))
    assert json.loads(args["grpc.service_config"]) == config
    with pytest.raises(ValueError, match=r"retries must be in \[0, 4\], got 5"):
        service_config(retries=5, backoff_seconds=0.05)
    with pytest.raises(ValueError, match="backoff_seconds must be in"):
        service_config(retries=1, backoff_seconds=0.0)


@run_async
async def test_unavailable_is_retried_a_bounded_number_of_times() -> None:
    async with serving(FakeTriton(always=UNAVAILABLE)) as (fake,):
        triton = client(fake.address, retries=2)
        try:
            with pytest.raises(BackendUnavailable):
                await infer(triton)
        finally:
            await triton.close()
    assert fake.attempts == 3  # the first attempt and two retries


@run_async
async def test_a_retry_after_unavailable_can_succeed() -> None:
    async with serving(FakeTriton(failures=[UNAVAILABLE, UNAVAILABLE])) as (fake,):
        triton = client(fake.address, retries=2)
        try:
            result = await infer(triton)
        finally:
            await triton.close()
    assert result["top_items"].tolist() == [[3]]
    assert fake.attempts == 3


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.NOT_FOUND, BackendUnavailable),  # the model is not loaded
        (grpc.StatusCode.INTERNAL, BackendError),
        (grpc.StatusCode.INVALID_ARGUMENT, BackendError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, BackendError),
    ],
)
@run_async
async def test_other_codes_are_not_retried(code: grpc.StatusCode, error: type[Exception]) -> None:
    async with serving(FakeTriton(always=code)) as (fake,):
        triton = client(fake.address, retries=4)
        try:
            with pytest.raises(error):
                await infer(triton)
        finally:
            await triton.close()
    assert fake.attempts == 1


@run_async
async def test_retries_stop_at_the_callers_deadline() -> None:
    """Backoffs of up to a second each would take seconds over 4 retries; the caller's 0.3 s
    deadline ends the call, as DEADLINE_EXCEEDED or, when the last attempt failed just before it,
    UNAVAILABLE."""
    async with serving(FakeTriton(always=UNAVAILABLE)) as (fake,):
        triton = client(fake.address, retries=4, backoff_seconds=1.0)
        try:
            start = time.monotonic()
            with pytest.raises((BackendTimeout, BackendUnavailable)):
                await infer(triton, deadline_seconds=0.3)
            elapsed = time.monotonic() - start
        finally:
            await triton.close()
    assert elapsed < 0.3 + 0.2
    assert 1 <= fake.attempts <= 5


@run_async
async def test_no_triton_listening_is_unavailable_within_the_deadline() -> None:
    triton = client(f"127.0.0.1:{free_ports(1)[0]}", retries=2)
    try:
        start = time.monotonic()
        with pytest.raises((BackendUnavailable, BackendTimeout)):
            await infer(triton, deadline_seconds=2.0)
        assert time.monotonic() - start < 2.0 + 0.2
    finally:
        await triton.close()


@run_async
async def test_round_robin_spreads_calls_over_every_address() -> None:
    async with serving(FakeTriton(), FakeTriton()) as fakes:
        triton = client(f"ipv4:{fakes[0].address},{fakes[1].address}", retries=2)
        try:
            for _ in range(40):
                await infer(triton)
        finally:
            await triton.close()
    assert sum(f.attempts for f in fakes) == 40
    assert min(f.attempts for f in fakes) >= 10, [f.attempts for f in fakes]


@run_async
async def test_a_retry_goes_to_the_next_address() -> None:
    """One Triton answers UNAVAILABLE to everything: every call still succeeds, retried on the
    other one."""
    async with serving(FakeTriton(always=UNAVAILABLE), FakeTriton()) as (down, up):
        triton = client(f"ipv4:{down.address},{up.address}", retries=1)
        try:
            # Until both connections are up, round_robin picks only the one that is: the
            # answering Triton may not be among them yet.
            while not (down.attempts and up.attempts):
                with contextlib.suppress(BackendUnavailable):
                    await infer(triton)
            down.attempts = up.attempts = 0
            for _ in range(20):
                await infer(triton)
        finally:
            await triton.close()
    assert up.attempts == 20
    assert down.attempts >= 5  # round_robin kept sending it first attempts


# --- through the gateway -------------------------------------------------------------------------


@run_async
async def test_gateway_answers_unavailable_after_bounded_retries(repository: Path) -> None:
    async with serving(FakeTriton(always=UNAVAILABLE)) as (fake,):
        transport = GrpcTritonTransport(fake.address, retries=2, backoff_seconds=0.01)
        try:
            async with running_gateway(repository, transport) as gw:  # type: ignore[arg-type]
                start = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
                elapsed = time.monotonic() - start
        finally:
            await transport.close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fake.attempts == 3
    assert elapsed < 3.0  # bounded retries with short backoff, not a hang


@run_async
async def test_gateway_recommends_after_a_retried_unavailable(repository: Path) -> None:
    async with serving(FakeTriton(failures=[UNAVAILABLE, UNAVAILABLE])) as (fake,):
        transport = GrpcTritonTransport(fake.address, retries=2, backoff_seconds=0.01)
        try:
            async with running_gateway(repository, transport) as gw:  # type: ignore[arg-type]
                response = await gw.stub.Recommend(recommender_pb2.RecommendRequest(k=1), timeout=5)
        finally:
            await transport.close()
    assert [item.item_id for item in response.items] == ["i3"]
    assert fake.attempts == 3


def test_response_outputs_read_raw_contents_by_name_and_refuse_a_missing_one() -> None:
    scores = np.array([[0.5, -1.25]], dtype=np.float32)
    items = np.array([[7, 3]], dtype=np.int64)
    response = service_pb2.ModelInferResponse(model_name="m")
    for name, array, datatype in (("top_scores", scores, "FP32"), ("top_items", items, "INT64")):
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    read = response_outputs(response, ["top_items", "top_scores"])
    np.testing.assert_array_equal(read["top_items"], items)
    np.testing.assert_array_equal(read["top_scores"], scores)
    assert read["top_items"].dtype == np.int64 and read["top_scores"].shape == (1, 2)
    with pytest.raises(InferenceServerException, match="output reasons missing"):
        response_outputs(response, ["top_items", "reasons"])
    # What the request carries is what tritonclient would send: names, types, shapes, bytes.
    request = infer_request("m", {"top_items": items}, ["top_scores"], "r-1")
    assert (request.model_name, request.id) == ("m", "r-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("top_items", "INT64", [1, 2])
    ]
    assert request.raw_input_contents == [items.tobytes()]
    assert [o.name for o in request.outputs] == ["top_scores"]


@run_async
async def test_a_triton_error_keeps_its_grpc_status_for_the_gateway() -> None:
    async with serving(FakeTriton(always=grpc.StatusCode.INVALID_ARGUMENT)) as (fake,):
        transport = GrpcTritonTransport(fake.address)
        try:
            with pytest.raises(InferenceServerException) as caught:
                await transport.infer("m", INPUTS, ["out"], client_timeout=5, request_id="r")
        finally:
            await transport.close()
    assert status_code(caught.value) == "INVALID_ARGUMENT"
