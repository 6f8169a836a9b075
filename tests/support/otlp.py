"""A minimal OTLP/HTTP trace receiver (protobuf on `/v1/traces`), standing in for a collector:
the integration tests point the gateway's and Triton's exporters at it and read their spans."""

from __future__ import annotations

import base64
import gzip
import http.server
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str  # lowercase hex, as in a traceparent
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict[str, object]


def _hex_ids_as_base64(export: dict[str, Any]) -> dict[str, Any]:
    """OTLP/JSON (Triton's exporter) writes ids in hex, where protobuf's JSON has base64."""
    for resource_spans in export.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return export


def _value(value: common_pb2.AnyValue) -> object:
    return getattr(value, value.WhichOneof("value") or "string_value")


class OtlpReceiver:
    """Collects every span exported to `http://127.0.0.1:<port>/v1/traces` (a context manager)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.errors: list[str] = []  # exports that could not be read, said when a wait fails
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def wait_for(
        self,
        ready: Callable[[list[ReceivedSpan]], bool],
        timeout_s: float = 20.0,
        *,
        fail: bool = True,
    ) -> list[ReceivedSpan]:
        """The spans once `ready(spans)` holds (exporters batch). After the timeout: fails, or
        with `fail=False` returns what came (the caller then flushes an exporter and waits
        again)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                spans = list(self.spans)
                errors = list(self.errors)
            if ready(spans):
                return spans
            if time.monotonic() > deadline:
                if not fail:
                    return spans
                raise AssertionError(
                    f"spans not received in {timeout_s} s: {spans}; exports refused: {errors}"
                )
            time.sleep(0.1)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (the http.server name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    if self.headers.get("Content-Encoding") == "gzip":
                        body = gzip.decompress(body)
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    if self.headers.get("Content-Type", "").startswith("application/json"):
                        json_format.ParseDict(_hex_ids_as_base64(json.loads(body)), request)
                    else:
                        request.ParseFromString(body)
                except Exception as error:  # a test's failure message says why, not a thread
                    with receiver._lock:
                        receiver.errors.append(f"{self.headers.get('User-Agent')}: {error!r}")
                    self.send_error(400, str(error))
                    return
                receiver._add(request)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet

        return Handler

    def _add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=resource.get("service.name", ""),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        with self._lock:
            self.spans.extend(received)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
