"""The one place where gateway errors become gRPC statuses, plus per-RPC metrics and log line.

`status_of` is the table; the interceptor applies it to whole RPCs, and `server.batch` to each
request of a RecommendBatch stream, whose errors are answered inline.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from server import metrics, tracing
from server.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    GatewayError,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
)
from server.hashing import user_hash
from server.validation import MAX_REQUEST_ID_CHARS

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[GatewayError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BackendTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    BackendError: grpc.StatusCode.INTERNAL,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
# Statuses whose message is ours to show; everything else answers with INTERNAL_MESSAGE.
_CALLER_FACING = frozenset(
    {
        InvalidArgument,
        NotFound,
        BackendUnavailable,
        Overloaded,
        BackendTimeout,
        Unauthenticated,
        PermissionDenied,
    }
)
INTERNAL_MESSAGE = "internal error; see the gateway log"
REQUEST_ID_METADATA_KEY = "x-request-id"

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("ltrec_request_id", default="")

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Any]]


def current_request_id() -> str:
    """The id of the RPC being served: the caller's `request_id` or a generated uuid4 hex."""
    return _request_id.get() or uuid.uuid4().hex


class MethodInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary-unary and stream-stream RPCs of the given services (not health or
    reflection checks) with `wrap_unary` / `wrap_stream`; each method's wrapped handler is built
    once (handlers are static), not per RPC.

    The gateway applies it when it registers its services (`wrap_handlers`, `add_wrapped`): an
    interceptor given to `grpc.aio.server` costs a coroutine pipeline per RPC even when it only
    returns a cached handler. As a server interceptor it behaves the same.
    """

    def __init__(self, service_names: tuple[str, ...]) -> None:
        self._prefixes = tuple(f"/{name}/" for name in service_names)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def wrap_unary(self, service: str, method: str, behavior: Behavior) -> Behavior:
        raise NotImplementedError

    def wrap_stream(self, service: str, method: str, behavior: StreamBehavior) -> StreamBehavior:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        full_method: str = handler_call_details.method
        wrapped = self._wrapped.get(full_method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or not full_method.startswith(self._prefixes):
            return handler
        wrapped = self.wrap_handler(full_method, handler)
        self._wrapped[full_method] = wrapped
        return wrapped

    def wrap_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> dict[str, grpc.RpcMethodHandler]:
        """A service's method handlers (by method name), each wrapped when the service is one of
        this interceptor's."""
        if f"/{service}/" not in self._prefixes:
            return dict(handlers)
        return {
            name: self.wrap_handler(f"/{service}/{name}", handler)
            for name, handler in handlers.items()
        }

    def wrap_handler(
        self, full_method: str, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler:
        service, method = full_method.lstrip("/").rsplit("/", 1)
        wrapped: grpc.RpcMethodHandler
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self.wrap_unary(service, method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.stream_stream is not None:
            wrapped = grpc.stream_stream_rpc_method_handler(
                self.wrap_stream(service, method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            return handler
        return wrapped


class _Registrar:
    """Stands in for the server in a generated `add_*Servicer_to_server`, keeping the method
    handlers it registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[Any]) -> None:
        pass  # the same handlers come through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers[service_name] = dict(method_handlers)


def add_wrapped(
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    interceptors: Sequence[MethodInterceptor],
) -> None:
    """Registers a servicer (through its generated `add_*Servicer_to_server`) with its methods
    wrapped by `interceptors`, the first outermost, as `grpc.aio.server(interceptors=...)`
    would order them, at no cost per RPC beyond the wrappers themselves."""
    registrar = _Registrar()
    add_to_server(servicer, registrar)
    for service, handlers in registrar.handlers.items():
        for interceptor in reversed(interceptors):
            handlers = interceptor.wrap_handlers(service, handlers)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def after_response(callback: Callable[..., object], *args: Any) -> None:
    """Runs `callback(*args)` in the event loop's next turn, in the current context (its span):
    for bookkeeping of an RPC whose answer is ready, which then goes out first. At once when no
    loop runs (a synchronous caller). A failure is logged, never raised into the RPC."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _guarded(callback, *args)
        return
    loop.call_soon(_guarded, callback, *args)


def _guarded(callback: Callable[..., object], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        logger.exception("bookkeeping after a response failed")


class GatewayInterceptor(MethodInterceptor):
    """Status codes, metrics, access-log lines and spans of the given services' RPCs."""

    def __init__(self, service_names: tuple[str, ...], user_hash_key: str = "") -> None:
        super().__init__(service_names)
        # Without a configured key, user hashes are consistent within this process only.
        self._user_hash_key = (user_hash_key or secrets.token_hex(32)).encode()

    def wrap_unary(self, service: str, method: str, behavior: Behavior) -> Behavior:
        return _wrap(service, method, behavior, self._user_hash_key)

    def wrap_stream(self, service: str, method: str, behavior: StreamBehavior) -> StreamBehavior:
        return _wrap_stream(service, method, behavior, self._user_hash_key)


class _Observer:
    """Counts and times one method's RPCs by status code, and writes their access-log lines."""

    def __init__(self, method: str, user_hash_key: bytes) -> None:
        self.method = method
        self._user_hash_key = user_hash_key
        # Metric children bound once per status code instead of a labels() lookup per RPC.
        self._counters: dict[grpc.StatusCode, Any] = {}
        self._durations: dict[grpc.StatusCode, Any] = {}
        self._messages: dict[grpc.StatusCode, str] = {}

    def begin(self, request_id: str, context: grpc.aio.ServicerContext) -> float:
        _request_id.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_METADATA_KEY, request_id),))
        metrics.IN_FLIGHT_REQUESTS.inc()
        return time.perf_counter()

    def end(self, code: grpc.StatusCode, start: float, request_id: str, user_id: str) -> None:
        """Ends an RPC's observation. The counters and the access-log line are recorded in the
        event loop's next turn (`after_response`), once gRPC has the answer to send: none of it
        changes the answer, and none of it delays it."""
        elapsed = time.perf_counter() - start
        metrics.IN_FLIGHT_REQUESTS.dec()
        after_response(self._record, code, elapsed, request_id, user_id)

    def _record(self, code: grpc.StatusCode, elapsed: float, request_id: str, user_id: str) -> None:
        if code not in self._counters:
            labels = {"method": self.method, "code": code.name}
            self._counters[code] = metrics.REQUESTS_TOTAL.labels(**labels)
            self._durations[code] = metrics.REQUEST_DURATION_SECONDS.labels(**labels)
            # The line's message as text: the log handler then has nothing to render or copy.
            self._messages[code] = f"{self.method} {code.name}"
        self._counters[code].inc()
        self._durations[code].observe(elapsed)
        # One access-log line per request (fields of the JSON object); the user only as a keyed
        # hash.
        logger.info(
            self._messages[code],
            extra={
                "event": "rpc",
                "request_id": request_id,
                "method": self.method,
                "code": code.name,
                "latency_ms": round(elapsed * 1000, 3),
                "user": user_hash(user_id, self._user_hash_key),
                "model_version": metrics.model_version(),
            },
        )

    def outcome(
        self, exc: BaseException, request_id: str, context: grpc.aio.ServicerContext
    ) -> tuple[grpc.StatusCode, str | None]:
        """The status an exception ends the RPC with, and the message to abort with (None: the
        RPC already ends with that status, so the exception goes on)."""
        if isinstance(exc, grpc.aio.AbortError):
            # Handlers raise GatewayError rather than abort; keep the status of one that did.
            return context.code() or grpc.StatusCode.UNKNOWN, None
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            return grpc.StatusCode.CANCELLED, None
        if isinstance(exc, Exception):
            return failure_status(exc, self.method, request_id)
        return grpc.StatusCode.UNKNOWN, None


def _wrap(service: str, method: str, behavior: Behavior, user_hash_key: bytes) -> Behavior:
    observer = _Observer(method, user_hash_key)

    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        request_id = request_id_of(request)
        code = grpc.StatusCode.UNKNOWN
        with tracing.rpc_span(service, method, context) as span:
            start = observer.begin(request_id, context)
            try:
                response = await behavior(request, context)
                code = grpc.StatusCode.OK
                return response
            except BaseException as exc:
                code, message = observer.outcome(exc, request_id, context)
                if code is grpc.StatusCode.INTERNAL:
                    span.record_exception(exc)
                if message is None:
                    raise
                await context.abort(code, message)
            finally:
                span.set_code(code, request_id)
                observer.end(code, start, request_id, getattr(request, "user_id", ""))

    return wrapped


def _wrap_stream(
    service: str, method: str, behavior: StreamBehavior, user_hash_key: bytes
) -> StreamBehavior:
    """A bidirectional stream is one RPC: one status, one duration, one span and one access-log
    line (with no user: its requests are each a user's, and `server.batch` logs them one by
    one)."""
    observer = _Observer(method, user_hash_key)

    async def wrapped(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        request_id = uuid.uuid4().hex
        code = grpc.StatusCode.UNKNOWN
        with tracing.rpc_span(service, method, context) as span:
            start = observer.begin(request_id, context)
            try:
                async for response in behavior(requests, context):
                    yield response
                code = grpc.StatusCode.OK
            except BaseException as exc:
                code, message = observer.outcome(exc, request_id, context)
                if code is grpc.StatusCode.INTERNAL:
                    span.record_exception(exc)
                if message is None:
                    raise
                await context.abort(code, message)
            finally:
                span.set_code(code, request_id)
                observer.end(code, start, request_id, "")

    return wrapped


def failure_status(exc: Exception, method: str, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status and caller-facing message of an exception a request ended in: the table for
    gateway errors, INTERNAL for anything else; INTERNAL ones are logged with their traceback."""
    if isinstance(exc, GatewayError):
        code, message = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            logger.error(
                "%s failed: %s", method, exc, exc_info=exc, extra=_fields(method, request_id)
            )
        return code, message
    logger.error("%s failed unexpectedly", method, exc_info=exc, extra=_fields(method, request_id))
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _fields(method: str, request_id: str) -> dict[str, str]:
    return {"event": "rpc_error", "method": method, "request_id": request_id}


def status_of(exc: GatewayError) -> tuple[grpc.StatusCode, str]:
    """The status code of a gateway error and the message the caller may see."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            message = str(exc) if cls in _CALLER_FACING else INTERNAL_MESSAGE
            return STATUS_BY_ERROR[cls], message
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def request_id_of(request: Any) -> str:
    """Echoes a usable caller id; a malformed one (rejected by validation) is not logged."""
    given = getattr(request, "request_id", "")
    # gRPC metadata values are printable ASCII; anything else cannot be echoed in a header.
    if (
        isinstance(given, str)
        and given.isascii()
        and given.isprintable()
        and 0 < len(given) <= MAX_REQUEST_ID_CHARS
    ):
        return given
    return uuid.uuid4().hex
