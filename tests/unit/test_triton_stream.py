"""Triton calls over `ModelStreamInfer` (`server.triton_stream`) against a fake stream: answers
matched to their callers by id (in any order; an error answer without an id is the oldest's),
each caller's own deadline (a late answer dropped, nothing left pending), a broken stream failing
its calls in flight and the next call opening a new one, streams replaced by age, unary calls
while tracing or to learn an error's status; then the gateway over real gRPC with a stream."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from ltrec_core import contract
from server.config import ConfigError, GatewayConfig
from server.errors import BackendTimeout, BackendUnavailable
from server.gen.ltrec.v1 import recommender_pb2
from server.triton_client import TritonClient, response_outputs, status_code
from server.triton_stream import (
    AnsweredWithError,
    InferStream,
    StreamingTritonTransport,
    infer_request,
)
from tests.support.gateway import event, run_async
from tests.support.triton_fake import FakeTritonService, gateway_over_fake_triton

OUTPUT = "score"
MODEL = contract.ENSEMBLE_MODEL
PLAIN = {"LTREC_ALLOW_PLAINTEXT": "true"}


class FakeCall:
    """A `ModelStreamInfer` call: records what is written; answers what the test puts in."""

    def __init__(self) -> None:
        self.written: list[service_pb2.ModelInferRequest] = []
        self.answers: asyncio.Queue[object] = asyncio.Queue()
        self.cancelled = False
        # While set and not open, a write waits for it (a slow network).
        self.write_gate: asyncio.Event | None = None

    async def write(self, request: service_pb2.ModelInferRequest) -> None:
        if self.write_gate is not None:
            try:
                await self.write_gate.wait()
            except asyncio.CancelledError:
                self.cancel()  # as grpc.aio does: a write cancelled cancels the whole call
                raise
        self.written.append(request)

    async def read(self) -> object:
        answer = await self.answers.get()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def answer(self, request_id: str, value: float) -> None:
        self.answers.put_nowait(stream_answer(request_id, value))

    def error(self, request_id: str, message: str) -> None:
        self.answers.put_nowait(
            service_pb2.ModelStreamInferResponse(
                error_message=message,
                infer_response=service_pb2.ModelInferResponse(id=request_id),
            )
        )


def stream_answer(request_id: str, value: float) -> service_pb2.ModelStreamInferResponse:
    array = np.asarray([[value]], dtype=np.float32)
    answer = service_pb2.ModelInferResponse(model_name=MODEL, id=request_id)
    answer.outputs.add(name=OUTPUT, datatype="FP32", shape=list(array.shape))
    answer.raw_output_contents.append(array.tobytes())
    return service_pb2.ModelStreamInferResponse(infer_response=answer)


def request(caller_id: str) -> service_pb2.ModelInferRequest:
    return infer_request(MODEL, {"x": np.zeros((1, 2), dtype=np.int64)}, [OUTPUT], caller_id)


def broken(code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="Socket closed"
    )


async def written(call: FakeCall, n: int) -> list[str]:
    """The ids of the first `n` requests written, once they are."""
    for _ in range(200):
        if len(call.written) >= n:
            return [r.id for r in call.written[:n]]
        await asyncio.sleep(0.005)
    raise AssertionError(f"{len(call.written)} requests written, expected {n}")


def value(answer: service_pb2.ModelInferResponse) -> float:
    return float(response_outputs(answer, [OUTPUT])[OUTPUT][0, 0])


# --- One stream ----------------------------------------------------------------------------------


@run_async
async def test_answers_go_to_their_callers_by_id_in_any_order() -> None:
    call = FakeCall()
    stream = InferStream(call)
    first = asyncio.create_task(stream.infer(request("req-a"), 5))
    second = asyncio.create_task(stream.infer(request("req-a"), 5))  # the same caller id
    ids = await written(call, 2)
    assert len(set(ids)) == 2 and all(i.startswith("req-a") for i in ids)
    call.answer(ids[1], 2.0)
    call.answer(ids[0], 1.0)
    assert value(await first) == 1.0
    assert value(await second) == 2.0
    assert stream.in_flight == 0 and stream.usable
    stream.close()
    await stream.wait_closed()


@run_async
async def test_an_error_answer_fails_only_its_call_and_one_without_an_id_is_the_oldest() -> None:
    call = FakeCall()
    stream = InferStream(call)
    calls = [asyncio.create_task(stream.infer(request(f"r{n}"), 5)) for n in range(3)]
    ids = await written(call, 3)
    call.error(ids[1], "input 'x' has the wrong shape")
    # Older Tritons clear the id of an answer that failed in the model: the oldest is answered.
    call.error("", "model failed")
    call.answer(ids[2], 3.0)
    with pytest.raises(AnsweredWithError, match="model failed"):
        await calls[0]
    with pytest.raises(AnsweredWithError, match="wrong shape"):
        await calls[1]
    assert value(await calls[2]) == 3.0
    assert stream.usable and stream.in_flight == 0
    stream.close()


@run_async
async def test_each_call_keeps_its_own_deadline_and_a_late_answer_is_dropped() -> None:
    call = FakeCall()
    stream = InferStream(call)
    slow = asyncio.create_task(stream.infer(request("slow"), 0.05))
    patient = asyncio.create_task(stream.infer(request("patient"), 5))
    ids = await written(call, 2)
    with pytest.raises(InferenceServerException) as exc:
        await slow
    assert status_code(exc.value) == "DEADLINE_EXCEEDED"
    assert stream.in_flight == 1  # the late caller is no longer pending
    call.answer(ids[0], 1.0)  # too late: nobody takes it
    call.answer(ids[1], 2.0)
    assert value(await patient) == 2.0
    assert stream.in_flight == 0 and stream.usable


@run_async
async def test_callers_leaving_during_a_slow_write_do_not_break_the_stream() -> None:
    call = FakeCall()
    call.write_gate = asyncio.Event()
    stream = InferStream(call)
    # The first is being written when its caller leaves; the second is still queued.
    leaving = [asyncio.create_task(stream.infer(request(f"gone{n}"), 0.02)) for n in (1, 2)]
    for task in leaving:
        with pytest.raises(InferenceServerException):
            await task
    call.write_gate.set()
    later = asyncio.create_task(stream.infer(request("later"), 5))
    ids = await written(call, 2)
    # The write under way finished (not cancelled: that would cancel the stream); the queued
    # request of a caller who left was never sent.
    assert [i.split("#")[0] for i in ids] == ["gone1", "later"] and not call.cancelled
    call.answer(ids[0], 0.0)  # dropped
    call.answer(ids[1], 4.0)
    assert value(await later) == 4.0
    assert stream.usable and stream.in_flight == 0


@pytest.mark.parametrize(
    ("end", "cause"),
    [
        (broken(), "the stream to Triton broke: UNAVAILABLE: Socket closed"),
        (grpc.aio.EOF, "Triton ended the stream"),
    ],
)
@run_async
async def test_a_broken_stream_fails_every_call_in_flight_with_unavailable(
    end: object, cause: str
) -> None:
    call = FakeCall()
    stream = InferStream(call)
    calls = [asyncio.create_task(stream.infer(request(f"r{n}"), 5)) for n in range(3)]
    await written(call, 3)
    call.answers.put_nowait(end)
    for task in calls:
        with pytest.raises(InferenceServerException) as exc:
            await task
        assert status_code(exc.value) == "UNAVAILABLE" and cause in exc.value.message()
    assert not stream.usable and stream.in_flight == 0 and call.cancelled
    with pytest.raises(InferenceServerException, match=cause):
        await stream.infer(request("after"), 5)
    await stream.wait_closed()


# --- The transport -------------------------------------------------------------------------------


class Opener:
    """`open_call` for the transport: a new FakeCall per stream, kept in `calls`."""

    def __init__(self) -> None:
        self.calls: list[FakeCall] = []

    def __call__(self) -> FakeCall:
        self.calls.append(FakeCall())
        return self.calls[-1]


class Unary:
    """The unary transport beside the streams: records calls, answers 7.0 or raises `error`."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.calls: list[tuple[str, float]] = []  # (request id, client timeout)
        self.closed = False

    async def infer(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        *,
        client_timeout: float,
        request_id: str,
    ) -> dict[str, np.ndarray]:
        self.calls.append((request_id, client_timeout))
        if self.error is not None:
            raise self.error
        return {OUTPUT: np.asarray([[7.0]], dtype=np.float32)}

    async def is_model_ready(self, model_name: str, *, client_timeout: float) -> bool:
        return True

    async def model_parameters(self, model_name: str, *, client_timeout: float) -> dict[str, str]:
        return {}

    async def close(self) -> None:
        self.closed = True


def transport(
    unary: Unary | None = None, *, streams: int = 1, max_age_seconds: float = 20.0
) -> tuple[StreamingTritonTransport, Opener, Unary]:
    opener = Opener()
    unary = unary or Unary()
    streaming = StreamingTritonTransport(
        unary, opener, streams=streams, max_age_seconds=max_age_seconds
    )
    return streaming, opener, unary


async def infer(
    streaming: StreamingTritonTransport, model: str = MODEL, timeout: float = 5
) -> dict[str, np.ndarray]:
    return await streaming.infer(
        model,
        {"x": np.zeros((1, 2), dtype=np.int64)},
        [OUTPUT],
        client_timeout=timeout,
        request_id="caller",
    )


async def answer_next(opener: Opener, stream: int, value: float) -> None:
    """Answers the first request written on the `stream`-th stream opened, once it is."""
    for _ in range(200):
        if len(opener.calls) > stream:
            break
        await asyncio.sleep(0.005)
    call = opener.calls[stream]
    (request_id,) = await written(call, 1)
    call.answer(request_id, value)


@run_async
async def test_a_broken_stream_is_replaced_on_the_next_call() -> None:
    streaming, opener, _ = transport()
    triton = TritonClient(streaming, timeout_seconds=5)
    first = asyncio.create_task(
        triton.infer({"x": np.zeros((1, 2))}, deadline=None, request_id="a", output_names=[OUTPUT])
    )
    await written_any(opener)
    opener.calls[0].answers.put_nowait(broken())
    with pytest.raises(BackendUnavailable):
        await first
    second = asyncio.create_task(infer(streaming))
    await answer_next(opener, 1, 9.0)
    assert (await second)[OUTPUT][0, 0] == 9.0
    assert len(opener.calls) == 2
    await streaming.close()


async def written_any(opener: Opener) -> None:
    for _ in range(200):
        if opener.calls and opener.calls[-1].written:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("nothing written")


@run_async
async def test_deadline_through_the_client_is_backend_timeout_and_leaves_nothing_pending() -> None:
    streaming, opener, _ = transport()
    triton = TritonClient(streaming, timeout_seconds=0.05)
    with pytest.raises(BackendTimeout):
        await triton.infer(
            {"x": np.zeros((1, 2))}, deadline=None, request_id="a", output_names=[OUTPUT]
        )
    (stream,) = [s for s in streaming._by_model[MODEL] if s is not None]
    assert stream.in_flight == 0 and stream.usable
    await streaming.close()
    assert opener.calls[0].cancelled


@run_async
async def test_models_get_streams_of_their_own_spread_over_the_configured_number() -> None:
    streaming, opener, _ = transport(streams=2)
    calls = [asyncio.create_task(infer(streaming)) for _ in range(2)]
    calls.append(asyncio.create_task(infer(streaming, contract.SIMILAR_ITEMS_MODEL)))
    for _ in range(100):
        if len(opener.calls) == 3 and all(c.written for c in opener.calls):
            break
        await asyncio.sleep(0.005)
    assert [len(c.written) for c in opener.calls] == [1, 1, 1]
    assert [c.written[0].model_name for c in opener.calls] == [
        MODEL,
        MODEL,
        contract.SIMILAR_ITEMS_MODEL,
    ]
    for n, call in enumerate(opener.calls):
        call.answer(call.written[0].id, float(n))
    assert [(await c)[OUTPUT][0, 0] for c in calls] == [0.0, 1.0, 2.0]
    await streaming.close()


@run_async
async def test_an_old_stream_finishes_its_calls_then_is_cancelled_and_replaced() -> None:
    streaming, opener, _ = transport(max_age_seconds=0.05)
    old_call = asyncio.create_task(infer(streaming))
    await written_any(opener)
    await asyncio.sleep(0.06)
    new_call = asyncio.create_task(infer(streaming))
    await answer_next(opener, 1, 2.0)
    assert (await new_call)[OUTPUT][0, 0] == 2.0
    assert not opener.calls[0].cancelled  # still carrying a call
    await answer_next_written(opener.calls[0], 1.0)
    assert (await old_call)[OUTPUT][0, 0] == 1.0
    assert opener.calls[0].cancelled and not opener.calls[1].cancelled
    await streaming.close()


async def answer_next_written(call: FakeCall, value: float) -> None:
    call.answer(call.written[-1].id, value)


@run_async
async def test_an_error_answer_is_asked_again_unary_for_its_status_code() -> None:
    unary = Unary(InferenceServerException("not found", status="StatusCode.NOT_FOUND"))
    streaming, opener, _ = transport(unary)
    triton = TritonClient(streaming, timeout_seconds=5)
    task = asyncio.create_task(
        triton.infer({"x": np.zeros((1, 2))}, deadline=None, request_id="a", output_names=[OUTPUT])
    )
    await written_any(opener)
    opener.calls[0].error(opener.calls[0].written[0].id, "unknown model")
    with pytest.raises(BackendUnavailable, match="not loaded"):
        await task
    ((request_id, timeout),) = unary.calls
    assert request_id == "a" and 0 < timeout <= 5
    await streaming.close()


@run_async
async def test_traced_calls_are_unary(spans: InMemorySpanExporter) -> None:
    streaming, opener, unary = transport()
    got = await infer(streaming)
    assert got[OUTPUT].tolist() == [[7.0]]
    assert opener.calls == [] and len(unary.calls) == 1
    await streaming.close()
    assert unary.closed


def test_the_request_is_what_tritonclient_would_send() -> None:
    from tritonclient.grpc import InferInput

    inputs = {
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "mask": np.asarray([[True], [False]]),
        "text": np.asarray([[b"ab"], [b"c"]], dtype=np.object_),
    }
    built = infer_request(MODEL, inputs, ["out"], "id-1")
    assert (built.model_name, built.id, [o.name for o in built.outputs]) == (MODEL, "id-1", ["out"])
    for tensor, raw, (name, array) in zip(
        built.inputs, built.raw_input_contents, inputs.items(), strict=True
    ):
        expected = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        expected.set_data_from_numpy(array)
        assert (tensor.name, tensor.datatype, list(tensor.shape)) == (
            name,
            expected.datatype(),
            expected.shape(),
        )
        assert raw == expected._get_content()


# --- Configuration and the gateway over real gRPC ------------------------------------------------


def test_transport_settings_are_validated_naming_the_variable() -> None:
    assert GatewayConfig.from_env(
        {**PLAIN, "LTREC_TRITON_TRANSPORT": " Stream "}
    ).triton_transport == ("stream")
    with pytest.raises(ConfigError, match=r"LTREC_TRITON_TRANSPORT must be one of .*'grpc'"):
        GatewayConfig.from_env({**PLAIN, "LTREC_TRITON_TRANSPORT": "grpc"})
    with pytest.raises(ConfigError, match=r"LTREC_TRITON_STREAMS must be in \[1, 16\], got 0"):
        GatewayConfig.from_env({**PLAIN, "LTREC_TRITON_STREAMS": "0"})
    with pytest.raises(ConfigError, match="LTREC_TRITON_STREAM_MAX_AGE_SECONDS must be a finite"):
        GatewayConfig.from_env({**PLAIN, "LTREC_TRITON_STREAM_MAX_AGE_SECONDS": "0"})


async def _recommend(tmp_path: Path, transport_name: str) -> tuple[list[str], FakeTritonService]:
    async with gateway_over_fake_triton(tmp_path, triton_transport=transport_name) as (stub, fake):
        answers = []
        for k in (2, 3, 1):
            request = recommender_pb2.RecommendRequest(
                k=k,
                history=[event("i1", recommender_pb2.EVENT_TYPE_VIEW, 100)],
                request_id=f"wire-{k}",
            )
            response = await stub.Recommend(request, timeout=5)
            answers.append(",".join(item.item_id for item in response.items))
    return answers, fake


@run_async
async def test_the_gateway_over_a_real_stream_answers_as_over_unary_calls(tmp_path: Path) -> None:
    over_unary, unary_fake = await _recommend(tmp_path / "unary", "unary")
    over_stream, stream_fake = await _recommend(tmp_path / "stream", "stream")
    assert over_stream == over_unary == ["i2", "i3,i2", ""]
    assert len(unary_fake.requests) == 3 and not unary_fake.stream_requests
    # One stream carried the three calls, each with its caller's request id first.
    assert stream_fake.streams_opened == 1 and not stream_fake.requests
    assert [r.id.split("#")[0] for r in stream_fake.stream_requests] == [
        "wire-2",
        "wire-3",
        "wire-1",
    ]
    sent = {t.name: (t.datatype, list(t.shape)) for t in stream_fake.stream_requests[0].inputs}
    assert sent == {t.name: (t.datatype, list(t.shape)) for t in unary_fake.requests[0].inputs}
