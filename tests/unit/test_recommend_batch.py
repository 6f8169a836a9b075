"""RecommendBatch against a fake Triton: correlation, inline errors, the bounds, metrics, logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from ltrec_core import contract
from server.batch import BatchLimits, BatchRunner
from server.config import ConfigError, GatewayConfig
from server.errors import InvalidArgument
from server.gen.ltrec.v1 import recommender_pb2
from server.interceptors import INTERNAL_MESSAGE
from tests.support.gateway import (
    METADATA,
    FakeTransport,
    Gateway,
    InferCall,
    access_log,
    event,
    log_lines,
    outputs,
    run_async,
)
from tests.support.gateway import running_gateway as _running_gateway

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


def running_gateway(
    repository: Path, fake: FakeTransport, **config: object
) -> contextlib.AbstractAsyncContextManager[Gateway]:
    """A gateway that makes one Triton call per request: these tests pace, fail and count the
    calls by request (coalesced calls, `server.coalesce`, are tested in test_coalesce.py)."""
    return _running_gateway(repository, fake, triton_coalesce=False, **config)


class PacedFake(FakeTransport):
    """Answers each request with a list of `k` items, after the delay set for its request id;
    records how many calls were in Triton at once (and fails the ids in `failing`)."""

    def __init__(self, delays: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.delays = dict(delays or {})
        self.default_delay = 0.0
        self.failing: dict[str, BaseException] = {}
        self.active = 0
        self.max_active = 0
        self.release: asyncio.Event | None = None  # when set: every call waits for it

    async def infer(self, model_name, inputs, output_names, *, client_timeout, request_id):  # type: ignore[no-untyped-def]
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.release is not None:
                await self.release.wait()
            await asyncio.sleep(self.delays.get(request_id, self.default_delay))
            self.calls.append(InferCall(model_name, dict(inputs), client_timeout, request_id))
            if request_id in self.failing:
                raise self.failing[request_id]
            # Items 2, 3, ... (item 1 is every request's history): k of them.
            k = int(inputs[contract.TOP_K].reshape(-1)[0])
            return outputs(list(range(2, k + 2)), [float(10 - n) for n in range(k)], [0] * k)
        finally:
            self.active -= 1


def _request(
    request_id: str, k: int = 2, **fields: object
) -> recommender_pb2.RecommendBatchRequest:
    return recommender_pb2.RecommendBatchRequest(
        request=recommender_pb2.RecommendRequest(
            user_id=f"user-of-{request_id}",
            request_id=request_id,
            k=k,
            history=[event("i1", recommender_pb2.EVENT_TYPE_VIEW, 100)],
            **fields,  # type: ignore[arg-type]
        )
    )


async def _stream(
    requests: Iterable[recommender_pb2.RecommendBatchRequest],
) -> AsyncIterator[recommender_pb2.RecommendBatchRequest]:
    for request in requests:
        yield request


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- Correlation and inline errors ---------------------------------------------------------------


@run_async
async def test_answers_come_in_completion_order_each_tied_to_its_request(repository: Path) -> None:
    # The first requests are the slowest: they are answered last.
    ids = [f"r{n}" for n in range(6)]
    fake = PacedFake({rid: 0.05 * (6 - n) for n, rid in enumerate(ids)})
    requests = [_request(rid, k=1 + n % 3) for n, rid in enumerate(ids)]
    async with running_gateway(repository, fake, batch_stream_window=6) as gw:
        call = gw.stub.RecommendBatch(_stream(requests), timeout=10)
        answers = [answer async for answer in call]
        assert await call.code() == grpc.StatusCode.OK
        single = await gw.stub.Recommend(requests[4].request, timeout=5)

    assert [a.index for a in answers] == [5, 4, 3, 2, 1, 0]
    for answer in answers:
        sent = requests[answer.index].request
        assert answer.WhichOneof("result") == "response"
        assert answer.request_id == sent.request_id == answer.response.request_id
        assert len(answer.response.items) == sent.k
        assert answer.response.model_version == METADATA["model_version"]
        assert answer.response.history_source == recommender_pb2.HISTORY_SOURCE_REQUEST
    # The same pipeline as a single Recommend: the same answer for the same request.
    assert {a.index: a for a in answers}[4].response == single
    # Each request went to Triton under its own request id, once.
    assert sorted(call.request_id for call in fake.ranking_calls()) == sorted([*ids, "r4"])


@run_async
async def test_a_bad_request_in_the_middle_is_answered_inline_and_the_others_succeed(
    repository: Path,
) -> None:
    fake = PacedFake()
    fake.failing["boom"] = InferenceServerException("bad shape", status="StatusCode.INTERNAL")
    requests = [
        _request("a"),
        recommender_pb2.RecommendBatchRequest(),  # no request at all
        _request("zero-k", k=0),
        _request("old-model", model_version="19990101-000000"),
        _request("boom"),
        _request("b"),
    ]
    codes = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL")
    before = {
        c: _sample("ltrec_gateway_batch_requests_total", method="RecommendBatch", code=c)
        for c in codes
    }
    stream_ok = {"method": "RecommendBatch", "code": "OK"}
    before_stream = _sample("ltrec_gateway_requests_total", **stream_ok)
    async with running_gateway(repository, fake) as gw:
        call = gw.stub.RecommendBatch(_stream(requests), timeout=10)
        answers = {answer.index: answer async for answer in call}
        assert await call.code() == grpc.StatusCode.OK

    assert sorted(answers) == [0, 1, 2, 3, 4, 5]
    assert [answers[i].WhichOneof("result") for i in range(6)] == [
        "response",
        "error",
        "error",
        "error",
        "error",
        "response",
    ]
    assert answers[1].error.code == INVALID_ARGUMENT
    assert answers[1].error.message == "request must be set (the RecommendRequest to answer)"
    assert len(answers[1].request_id) == 32  # generated, as for a Recommend without one
    assert answers[2].request_id == "zero-k"
    assert answers[2].error.code == INVALID_ARGUMENT
    assert answers[2].error.message == "k must be in [1, 500], got 0"
    assert answers[3].error.code == NOT_FOUND
    assert "model_version '19990101-000000' is not served here" in answers[3].error.message
    # A backend failure is INTERNAL with the generic message, as for Recommend.
    assert (answers[4].error.code, answers[4].error.message) == (INTERNAL, INTERNAL_MESSAGE)
    assert [len(answers[i].response.items) for i in (0, 5)] == [2, 2]
    # Invalid requests never reach Triton.
    assert sorted(c.request_id for c in fake.ranking_calls()) == ["a", "b", "boom"]

    after = {
        c: _sample("ltrec_gateway_batch_requests_total", method="RecommendBatch", code=c)
        for c in codes
    }
    assert {c: after[c] - before[c] for c in codes} == {
        "OK": 2,
        "INVALID_ARGUMENT": 2,
        "NOT_FOUND": 1,
        "INTERNAL": 1,
    }
    assert _sample("ltrec_gateway_requests_total", **stream_ok) == before_stream + 1


@run_async
async def test_an_empty_stream_is_ok_with_no_answers(repository: Path) -> None:
    async with running_gateway(repository, PacedFake()) as gw:
        call = gw.stub.RecommendBatch(_stream([]), timeout=5)
        assert [answer async for answer in call] == []
        assert await call.code() == grpc.StatusCode.OK


# --- The bounds ----------------------------------------------------------------------------------


@run_async
async def test_the_window_bounds_the_requests_in_triton(repository: Path) -> None:
    fake = PacedFake()
    fake.default_delay = 0.01
    requests = [_request(f"r{n}") for n in range(40)]
    async with running_gateway(repository, fake, batch_stream_window=4) as gw:
        answers = [a async for a in gw.stub.RecommendBatch(_stream(requests), timeout=10)]
    assert sorted(a.index for a in answers) == list(range(40))
    assert all(a.WhichOneof("result") == "response" for a in answers)
    assert fake.max_active == 4  # reached, never exceeded


@run_async
async def test_the_gateway_wide_limit_bounds_all_streams_together(repository: Path) -> None:
    fake = PacedFake()
    fake.default_delay = 0.01
    settings = {"batch_stream_window": 4, "batch_max_in_flight": 3}
    async with running_gateway(repository, fake, **settings) as gw:

        async def one_stream(name: str) -> list[recommender_pb2.RecommendBatchResponse]:
            requests = [_request(f"{name}{n}") for n in range(15)]
            return [a async for a in gw.stub.RecommendBatch(_stream(requests), timeout=10)]

        first, second = await asyncio.gather(one_stream("a"), one_stream("b"))
    assert len(first) == len(second) == 15
    assert fake.max_active == 3


@run_async
async def test_more_requests_than_a_stream_takes_end_it_invalid_argument_after_the_answers(
    repository: Path,
) -> None:
    requests = [_request(f"r{n}") for n in range(5)]
    async with running_gateway(repository, PacedFake(), batch_max_requests_per_stream=3) as gw:
        call = gw.stub.RecommendBatch(_stream(requests), timeout=10)
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for answer in call:
                answers.append(answer)
    assert sorted(a.index for a in answers) == [0, 1, 2]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "a RecommendBatch stream must have at most 3 requests, got more: the first 3 were "
        "answered, send the rest on a new stream"
    )


@run_async
async def test_a_cancelled_stream_gives_its_slots_back(repository: Path) -> None:
    """The caller goes away while its requests are in Triton: the next stream is not held up
    by slots the first one never gave back."""
    fake = PacedFake()
    fake.release = asyncio.Event()
    settings = {"batch_stream_window": 2, "batch_max_in_flight": 2}
    async with running_gateway(repository, fake, **settings) as gw:
        call = gw.stub.RecommendBatch(_stream([_request(f"r{n}") for n in range(10)]), timeout=10)
        for _ in range(200):
            if fake.active == 2:
                break
            await asyncio.sleep(0.01)
        assert fake.active == 2
        call.cancel()
        for _ in range(200):
            if fake.active == 0:
                break
            await asyncio.sleep(0.01)
        assert fake.active == 0
        fake.release.set()
        answers = [a async for a in gw.stub.RecommendBatch(_stream([_request("x")]), timeout=5)]
    assert [a.request_id for a in answers] == ["x"]
    assert _sample("ltrec_gateway_batch_requests_in_flight") == 0


@run_async
async def test_the_runner_reads_at_most_a_window_ahead_of_the_answers_taken() -> None:
    """Requests read and not yet answered (in the pipeline, or answered but not yet taken by
    gRPC) never exceed the window: a slow reader of answers holds the stream back."""
    window = 3
    pulled = 0

    async def requests() -> AsyncIterator[recommender_pb2.RecommendBatchRequest]:
        nonlocal pulled
        for n in range(20):
            pulled += 1
            yield _request(f"r{n}")

    async def answer(
        request: recommender_pb2.RecommendRequest, request_id: str
    ) -> recommender_pb2.RecommendResponse:
        await asyncio.sleep(0)
        return recommender_pb2.RecommendResponse(request_id=request_id)

    runner = BatchRunner(BatchLimits(window=window, max_in_flight=64), b"key")
    taken = 0
    most_ahead = 0
    async for result in runner.run(requests(), answer):
        taken += 1
        most_ahead = max(most_ahead, pulled - taken)
        await asyncio.sleep(0.005)  # gRPC slow to send
        most_ahead = max(most_ahead, pulled - taken)
        assert result.response.request_id == f"r{result.index}"
    assert taken == 20
    assert most_ahead == window - 1  # the window is full while one answer is being sent


@run_async
async def test_the_runner_raises_the_stream_bound_after_answering_what_it_took() -> None:
    async def answer(
        request: recommender_pb2.RecommendRequest, request_id: str
    ) -> recommender_pb2.RecommendResponse:
        return recommender_pb2.RecommendResponse(request_id=request_id)

    runner = BatchRunner(BatchLimits(window=2, max_in_flight=2, max_requests=4), b"key")
    seen: list[int] = []
    with pytest.raises(InvalidArgument, match="must have at most 4 requests"):
        async for result in runner.run(_stream(_request(f"r{n}") for n in range(9)), answer):
            seen.append(result.index)
    assert sorted(seen) == [0, 1, 2, 3]


@run_async
async def test_example_client_recommends_for_several_users_over_one_stream(
    repository: Path,
) -> None:
    root = Path(__file__).resolve().parents[2]
    fake = PacedFake()
    async with running_gateway(repository, fake) as gw:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "examples/recommend_client.py", "--address", gw.address,
            "--batch", "3", "--user", "news", "-k", "2",
            cwd=root, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert sorted(line.split(" ")[:2] for line in lines[:-1]) == [
        ["#0", "news-1"],
        ["#1", "news-2"],
        ["#2", "news-3"],
    ]
    assert lines[-1] == "3 users: 3 lists, 0 errors"
    assert len(fake.ranking_calls()) == 3


# --- Logs and configuration ----------------------------------------------------------------------


@run_async
async def test_each_request_gets_a_log_line_without_the_user_id(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    requests = [_request("ok-1"), _request("bad", k=0)]
    async with running_gateway(repository, PacedFake()) as gw:
        call = gw.stub.RecommendBatch(_stream(requests), timeout=5)
        [a async for a in call]
        trailing = dict(await call.trailing_metadata())
    per_request = {line["request_id"]: line for line in log_lines(caplog, "batch_request")}
    (stream,) = [line for line in access_log(caplog) if line["method"] == "RecommendBatch"]
    assert set(per_request) == {"ok-1", "bad"}
    assert (per_request["ok-1"]["code"], per_request["bad"]["code"]) == ("OK", "INVALID_ARGUMENT")
    assert {line["index"] for line in per_request.values()} == {0, 1}
    assert all(line["stream_request_id"] == stream["request_id"] for line in per_request.values())
    assert trailing["x-request-id"] == stream["request_id"]
    assert stream["code"] == "OK"
    assert all(len(line["user"]) == 16 for line in per_request.values())
    assert "user-of-" not in caplog.text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LTREC_BATCH_STREAM_WINDOW": "0"},
            "LTREC_BATCH_STREAM_WINDOW must be in [1, 1024], got 0",
        ),
        (
            {"LTREC_BATCH_MAX_IN_FLIGHT": "5000"},
            "LTREC_BATCH_MAX_IN_FLIGHT must be in [1, 4096], got 5000",
        ),
        (
            {"LTREC_BATCH_MAX_REQUESTS_PER_STREAM": "-1"},
            "LTREC_BATCH_MAX_REQUESTS_PER_STREAM must be in [1, 1000000], got -1",
        ),
    ],
)
def test_batch_limits_are_configured_with_bounds(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        GatewayConfig.from_env({"LTREC_ALLOW_PLAINTEXT": "true", **env})
    assert message in str(caught.value)
    config = GatewayConfig.from_env({"LTREC_ALLOW_PLAINTEXT": "true"})
    assert (
        config.batch_stream_window,
        config.batch_max_in_flight,
        config.batch_max_requests_per_stream,
    ) == (16, 64, 10_000)
