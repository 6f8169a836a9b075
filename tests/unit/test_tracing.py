"""Traces: the span tree of an RPC (RPC span -> stage spans -> Triton call), the caller's W3C
`traceparent` as its parent, the context passed on to Triton in the gRPC metadata, and the
`OTEL_*` configuration (off by default)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from ltrec_core import contract
from server import tracing
from server.errors import StartupError
from server.gen.ltrec.v1 import recommender_pb2
from tests.support.gateway import (
    FakeTransport,
    event,
    full_request,
    outputs,
    run_async,
    running_gateway,
    unavailable,
)
from tests.support.tracing import by_name
from tests.support.triton_fake import FakeTritonService, gateway_over_fake_triton

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
RECOMMEND = "ltrec.v1.Recommender/Recommend"
TRITON_CALL = "inference.GRPCInferenceService/ModelInfer"
RECOMMEND_STAGES = {"validate", "history", "features", "triton", "postprocess"}


def _children(parent: ReadableSpan, finished: Iterable[ReadableSpan]) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        span
        for span in finished
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]


def _trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_trace_id(span.context.trace_id)


def _span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_span_id(span.context.span_id)


@run_async
async def test_recommend_is_one_span_per_stage_under_the_callers_span(
    repository: Path, spans: InMemorySpanExporter
) -> None:
    async with running_gateway(repository, FakeTransport(outputs([3], [1.0], [0]))) as gw:
        await gw.stub.Recommend(full_request(), metadata=TRACEPARENT, timeout=5)
    finished = spans.get_finished_spans()
    named = by_name(finished)

    rpc = named[RECOMMEND]
    assert rpc.kind is SpanKind.SERVER
    assert rpc.parent is not None and rpc.parent.is_remote
    assert format_span_id(rpc.parent.span_id) == CALLER_SPAN
    assert {_trace_id(span) for span in finished} == {CALLER_TRACE}
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.method"] == "Recommend"
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert rpc.attributes["ltrec.request_id"] == "req-123"
    assert rpc.status.status_code is StatusCode.UNSET

    stages = _children(rpc, finished)
    assert {span.name for span in stages} == RECOMMEND_STAGES
    # In pipeline order, each within the RPC's span.
    order = [span.name for span in sorted(stages, key=lambda span: span.start_time or 0)]
    assert order == ["validate", "history", "features", "triton", "postprocess"]
    assert all(
        (rpc.start_time or 0)
        <= (span.start_time or 0)
        <= (span.end_time or 0)
        <= (rpc.end_time or 0)
        for span in stages
    )
    (attempt,) = _children(named["triton"], finished)
    assert attempt.name == TRITON_CALL and attempt.kind is SpanKind.CLIENT
    assert attempt.attributes is not None
    assert attempt.attributes["ltrec.triton.model"] == contract.ENSEMBLE_MODEL
    assert set(named) == {RECOMMEND, *RECOMMEND_STAGES, TRITON_CALL}


@run_async
async def test_without_a_traceparent_each_rpc_starts_its_own_trace(
    repository: Path, spans: InMemorySpanExporter
) -> None:
    async with running_gateway(repository, FakeTransport(outputs([3], [1.0], [0]))) as gw:
        for _ in range(2):
            await gw.stub.Recommend(full_request(), timeout=5)
    finished = spans.get_finished_spans()
    rpcs = [span for span in finished if span.name == RECOMMEND]
    assert len(rpcs) == 2 and all(span.parent is None for span in rpcs)
    first, second = (_trace_id(span) for span in rpcs)
    assert first != second
    for rpc in rpcs:
        assert {span.name for span in _children(rpc, finished)} == RECOMMEND_STAGES


@run_async
async def test_a_failed_triton_call_is_an_error_span(
    repository: Path, spans: InMemorySpanExporter
) -> None:
    """One CLIENT span per Triton call (gRPC's own retries on UNAVAILABLE happen inside the
    channel, `tests/unit/test_triton_channel.py`); a call that fails is an error span with the
    exception, and the next call's span is fine."""
    fake = FakeTransport(outputs([3], [1.0], [0]))
    fake.errors = [unavailable()]
    async with running_gateway(repository, fake) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await gw.stub.Recommend(full_request(), timeout=5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        await gw.stub.Recommend(full_request(), timeout=5)
    finished = spans.get_finished_spans()
    stages = sorted(
        (span for span in finished if span.name == "triton"), key=lambda s: s.start_time or 0
    )
    calls = [_children(stage, finished) for stage in stages]
    assert [len(c) for c in calls] == [1, 1]
    assert [c[0].status.status_code for c in calls] == [StatusCode.ERROR, StatusCode.UNSET]
    assert [e.name for e in calls[0][0].events] == ["exception"]


@run_async
async def test_a_failed_rpc_marks_its_span_by_code(
    repository: Path, spans: InMemorySpanExporter
) -> None:
    """Server errors (INTERNAL) are span errors with the exception; the caller's mistakes
    (INVALID_ARGUMENT) only carry their code."""
    fake = FakeTransport()
    fake.always = RuntimeError("secret detail")
    async with running_gateway(repository, fake) as gw:
        for request in (full_request(), recommender_pb2.RecommendRequest(k=0)):
            with pytest.raises(grpc.aio.AioRpcError):
                await gw.stub.Recommend(request, timeout=5)
    finished = spans.get_finished_spans()
    internal, invalid = sorted(
        (span for span in finished if span.name == RECOMMEND), key=lambda s: s.start_time or 0
    )
    assert internal.status.status_code is StatusCode.ERROR
    assert internal.status.description == "INTERNAL"
    assert internal.attributes is not None
    assert internal.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    (exception,) = internal.events
    assert exception.attributes is not None
    assert exception.attributes["exception.type"] == "RuntimeError"
    assert {s.name for s in _children(internal, finished)} == {
        "validate",
        "history",
        "features",
        "triton",
    }
    assert invalid.status.status_code is StatusCode.UNSET
    assert invalid.attributes is not None
    assert invalid.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    (validate,) = _children(invalid, finished)
    assert validate.name == "validate" and validate.status.status_code is StatusCode.ERROR


@run_async
async def test_a_batch_stream_is_one_span_over_its_requests_stages(
    repository: Path, spans: InMemorySpanExporter
) -> None:
    async def stream() -> AsyncIterator[recommender_pb2.RecommendBatchRequest]:
        for request_id in ("b-1", "b-2"):
            yield recommender_pb2.RecommendBatchRequest(
                request=recommender_pb2.RecommendRequest(
                    request_id=request_id,
                    k=1,
                    history=[event("i1", recommender_pb2.EVENT_TYPE_VIEW, 100)],
                )
            )

    async with running_gateway(repository, FakeTransport(outputs([3], [1.0], [0]))) as gw:
        answers = [a async for a in gw.stub.RecommendBatch(stream(), metadata=TRACEPARENT)]
    assert len(answers) == 2
    finished = spans.get_finished_spans()
    (rpc,) = [span for span in finished if span.name == "ltrec.v1.Recommender/RecommendBatch"]
    assert rpc.parent is not None and format_span_id(rpc.parent.span_id) == CALLER_SPAN
    stages = [span.name for span in _children(rpc, finished)]
    assert sorted(stages) == sorted([*RECOMMEND_STAGES] * 2)


async def _recommend_through_the_wire(
    tmp_path: Path, metadata: tuple[tuple[str, str], ...]
) -> FakeTritonService:
    """One Recommend through the gateway and the real tritonclient transport to a fake Triton."""
    async with gateway_over_fake_triton(tmp_path) as (stub, fake):
        request = recommender_pb2.RecommendRequest(
            k=2, history=[event("i1", recommender_pb2.EVENT_TYPE_VIEW, 100)]
        )
        response = await stub.Recommend(request, metadata=metadata, timeout=5)
    assert [item.item_id for item in response.items] == ["i2"]  # i1 is history: dropped
    return fake


@run_async
async def test_the_triton_call_carries_the_trace_to_triton(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    fake = await _recommend_through_the_wire(tmp_path, TRACEPARENT)
    (attempt,) = [span for span in spans.get_finished_spans() if span.name == TRITON_CALL]
    (metadata,) = fake.metadata
    # Triton's spans become children of the gateway's Triton attempt, in the caller's trace.
    assert metadata["traceparent"] == f"00-{CALLER_TRACE}-{_span_id(attempt)}-01"


@run_async
async def test_tracing_is_off_by_default_and_sends_triton_no_trace(tmp_path: Path) -> None:
    assert not tracing.enabled()
    fake = await _recommend_through_the_wire(tmp_path, TRACEPARENT)
    (metadata,) = fake.metadata
    assert "traceparent" not in metadata


# --- Configuration from OTEL_* -----------------------------------------------------------------


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    ):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    tracing.enable(None)


def test_no_exporter_means_no_tracing(otel_env: pytest.MonkeyPatch) -> None:
    assert tracing.configure_tracing() is None
    otel_env.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.configure_tracing() is None
    assert not tracing.enabled()
    assert tracing.outgoing_headers() is None


def test_sdk_disabled_wins_over_an_exporter(otel_env: pytest.MonkeyPatch) -> None:
    otel_env.setenv("OTEL_TRACES_EXPORTER", "console")
    otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.configure_tracing() is None
    assert not tracing.enabled()


@pytest.mark.parametrize(
    ("exporters", "service"), [("console", None), ("otlp,console", "recs-eu"), ("otlp", "recs")]
)
def test_exporters_and_service_name_come_from_the_environment(
    otel_env: pytest.MonkeyPatch, exporters: str, service: str | None
) -> None:
    otel_env.setenv("OTEL_TRACES_EXPORTER", exporters)
    if service is not None:
        otel_env.setenv("OTEL_SERVICE_NAME", service)
    provider = tracing.configure_tracing()
    assert provider is not None
    try:
        assert tracing.enabled()
        assert provider.resource.attributes["service.name"] == (
            service or tracing.DEFAULT_SERVICE_NAME
        )
        processors = provider._active_span_processor._span_processors
        exported = sorted(type(p.span_exporter).__name__ for p in processors)  # type: ignore[attr-defined]
        expected = {"otlp": "OTLPSpanExporter", "console": "ConsoleSpanExporter"}
        assert exported == sorted(expected[name] for name in exporters.split(","))
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_EXPORTER", "jaeger"),
        ("OTEL_TRACES_EXPORTER", "none,console"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ],
)
def test_an_unusable_value_fails_startup_naming_the_variable(
    otel_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    otel_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    otel_env.setenv(variable, value)
    with pytest.raises(StartupError, match=f"{variable} must be one of .*got '{value}'"):
        tracing.configure_tracing()
    assert not tracing.enabled()
