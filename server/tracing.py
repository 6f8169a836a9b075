"""OpenTelemetry traces: one span per RPC, one per pipeline stage, one per Triton call.

Off unless `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`); then every RPC of the
gateway's services gets a SERVER span, a child of the caller's span when the request carries a
W3C `traceparent` (the `OTEL_PROPAGATORS` of the API, default `tracecontext,baggage`), each
pipeline stage a child span named as its `stage` label of `ltrec_gateway_stage_duration_seconds`,
and each Triton attempt a CLIENT span whose context goes to Triton in the request's gRPC metadata
(Triton's own OpenTelemetry traces join the gateway's).

The SDK reads the rest of the standard variables itself: `OTEL_SDK_DISABLED`, `OTEL_SERVICE_NAME`
and `OTEL_RESOURCE_ATTRIBUTES` (default service name `ltrec-gateway`), `OTEL_TRACES_SAMPLER`,
`OTEL_BSP_*`, and for `otlp` (HTTP/protobuf) `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `..._HEADERS`,
`..._TIMEOUT`, `..._CERTIFICATE`. Off, a stage costs a `None` check and an RPC nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import grpc
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import Histogram

from server import metrics
from server.errors import StartupError

TRACES_EXPORTERS = ("otlp", "console", "none")
DEFAULT_SERVICE_NAME = "ltrec-gateway"
# The OTLP exporter shipped with the gateway speaks HTTP/protobuf (no second gRPC stack).
OTLP_PROTOCOLS = ("http/protobuf",)
INSTRUMENTATION_NAME = "ltrec.gateway"
# The status codes that mark a SERVER span as an error (OpenTelemetry's gRPC conventions: the
# caller's mistakes, such as INVALID_ARGUMENT or NOT_FOUND, are not the server's errors).
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

logger = logging.getLogger(__name__)
_tracer: trace.Tracer | None = None
_OFF = contextlib.nullcontext()  # reusable


def configure_tracing() -> TracerProvider | None:
    """The tracer provider the `OTEL_*` variables ask for (installed here), or None: off.

    Raises StartupError naming the variable when its value cannot be used."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = exporter_names(os.environ)
    exporters = [_exporter(name) for name in names]
    if not exporters:
        return None
    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER
    for exporter in exporters:
        # Spans are exported from the processor's thread, never on the event loop.
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_*
    enable(provider)
    logger.info(
        "traces: %s, as service %s", ", ".join(names), resource.attributes.get(SERVICE_NAME)
    )
    return provider


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """`OTEL_TRACES_EXPORTER` as a list of exporters; unset or `none`: none (tracing off)."""
    raw = environ.get("OTEL_TRACES_EXPORTER", "none")
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRACES_EXPORTERS]
    if unknown or ("none" in names and len(names) > 1):
        raise StartupError(
            f"OTEL_TRACES_EXPORTER must be one of {TRACES_EXPORTERS} (otlp and console may be "
            f"given together, comma-separated), got {raw!r}"
        )
    return [name for name in names if name != "none"]


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        # One span per line on stdout (the log is on stderr), JSON like the log lines.
        return ConsoleSpanExporter(formatter=_one_line)
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    ).strip()
    if protocol and protocol not in OTLP_PROTOCOLS:
        raise StartupError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL must be one of {OTLP_PROTOCOLS} (the gateway exports "
            f"OTLP over HTTP, port 4318 by default), got {protocol!r}"
        )
    # Imported here: its HTTP client is loaded only when it is used.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_[TRACES_]{ENDPOINT,HEADERS,TIMEOUT,...}


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + os.linesep


def enable(provider: trace.TracerProvider | None) -> None:
    """Traces with `provider` from now on (tests pass one with an in-memory exporter); None: off."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer(INSTRUMENTATION_NAME)


def enabled() -> bool:
    return _tracer is not None


class Stage:
    """One pipeline stage: `with stage.time():` observes the stage histogram, as
    `STAGE_DURATION_SECONDS.labels(stage=...).time()` did, and with tracing on opens a span."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._histogram = metrics.STAGE_DURATION_SECONDS.labels(stage=name)

    def time(self) -> _StageTimer:
        return _StageTimer(self.name, self._histogram)


class _StageTimer:
    """Per use (a stage may await, and requests overlap)."""

    __slots__ = ("_histogram", "_name", "_span", "_start")

    def __init__(self, name: str, histogram: Histogram) -> None:
        self._name = name
        self._histogram = histogram
        self._span: Any = None

    def __enter__(self) -> None:
        if _tracer is not None:
            self._span = _tracer.start_as_current_span(self._name)
            self._span.__enter__()
        self._start = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._histogram.observe(time.perf_counter() - self._start)
        if self._span is not None:
            # Records an exception the stage raised, with an ERROR status.
            self._span.__exit__(exc_type, exc, traceback)


class RpcSpan:
    """The SERVER span of one RPC, current while the RPC runs; its parent is the caller's span
    when the invocation metadata carries one."""

    __slots__ = ("_attributes", "_context", "_name", "_span", "_token")

    def __init__(
        self, name: str, attributes: dict[str, str], servicer_context: grpc.aio.ServicerContext
    ) -> None:
        self._name = name
        self._attributes = attributes
        self._context = servicer_context
        self._span: trace.Span | None = None
        self._token: object = None

    def __enter__(self) -> RpcSpan:
        if _tracer is not None:
            metadata = self._context.invocation_metadata() or ()
            carrier = {key: value for key, value in metadata if isinstance(value, str)}
            self._span = _tracer.start_span(
                self._name,
                context=propagate.extract(carrier),
                kind=trace.SpanKind.SERVER,
                attributes=self._attributes,
            )
            self._token = context.attach(trace.set_span_in_context(self._span))
        return self

    def set_code(self, code: grpc.StatusCode, request_id: str) -> None:
        if self._span is None:
            return
        self._span.set_attribute("rpc.grpc.status_code", code.value[0])
        self._span.set_attribute("ltrec.request_id", request_id)
        if code in SERVER_ERROR_CODES:
            self._span.set_status(trace.StatusCode.ERROR, code.name)

    def record_exception(self, exc: BaseException) -> None:
        if self._span is not None:
            self._span.record_exception(exc)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._span is None:
            return
        context.detach(self._token)  # type: ignore[arg-type]
        self._span.end()


def rpc_span(service: str, method: str, servicer_context: grpc.aio.ServicerContext) -> RpcSpan:
    """The span of one RPC (a context manager); its metadata is read only when tracing."""
    return RpcSpan(
        f"{service}/{method}",
        {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        servicer_context,
    )


def triton_span(model_name: str) -> AbstractContextManager[Any]:
    """The CLIENT span of one Triton inference call, gRPC's own retries on UNAVAILABLE
    included (`server.triton_client`: they happen inside the channel), a context manager."""
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(
        "inference.GRPCInferenceService/ModelInfer",
        kind=trace.SpanKind.CLIENT,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": "inference.GRPCInferenceService",
            "rpc.method": "ModelInfer",
            "ltrec.triton.model": model_name,
        },
    )


def outgoing_headers() -> dict[str, str] | None:
    """The current span's context as gRPC metadata (`traceparent`, ...) for a call to Triton;
    None when tracing is off."""
    if _tracer is None:
        return None
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def trace_ids() -> Sequence[str] | None:
    """The current span's (trace id, span id) as lowercase hex, or None outside a valid span."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return (
        trace.format_trace_id(span_context.trace_id),
        trace.format_span_id(span_context.span_id),
    )
