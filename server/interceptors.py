"""The one place where gateway errors become gRPC statuses, plus per-RPC metrics and log line."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server import metrics
from server.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    GatewayError,
    InvalidArgument,
    NotFound,
    Overloaded,
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
}
# Statuses whose message is ours to show; everything else answers with INTERNAL_MESSAGE.
_CALLER_FACING = frozenset(
    {InvalidArgument, NotFound, BackendUnavailable, Overloaded, BackendTimeout}
)
INTERNAL_MESSAGE = "internal error; see the gateway log"
REQUEST_ID_METADATA_KEY = "x-request-id"

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("ltrec_request_id", default="")

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def current_request_id() -> str:
    """The id of the RPC being served: the caller's `request_id` or a generated uuid4 hex."""
    return _request_id.get() or uuid.uuid4().hex


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary RPCs of the given services (not health or reflection checks)."""

    def __init__(self, service_names: tuple[str, ...], user_hash_key: str = "") -> None:
        self._prefixes = tuple(f"/{name}/" for name in service_names)
        # Without a configured key, user hashes are consistent within this process only.
        self._user_hash_key = (user_hash_key or secrets.token_hex(32)).encode()
        # Wrapped handlers are built once per method (handlers are static), not per RPC.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

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
        if (
            handler is None
            or handler.unary_unary is None
            or not full_method.startswith(self._prefixes)
        ):
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            _wrap(full_method.rsplit("/", 1)[-1], handler.unary_unary, self._user_hash_key),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[full_method] = wrapped
        return wrapped


def _wrap(method: str, behavior: Behavior, user_hash_key: bytes) -> Behavior:
    # Metric children bound once per status code instead of a labels() lookup per RPC.
    counters: dict[grpc.StatusCode, Any] = {}
    durations: dict[grpc.StatusCode, Any] = {}

    def observe(code: grpc.StatusCode, elapsed: float) -> None:
        if code not in counters:
            counters[code] = metrics.REQUESTS_TOTAL.labels(method=method, code=code.name)
            durations[code] = metrics.REQUEST_DURATION_SECONDS.labels(method=method, code=code.name)
        counters[code].inc()
        durations[code].observe(elapsed)

    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        request_id = _request_id_of(request)
        _request_id.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_METADATA_KEY, request_id),))
        code = grpc.StatusCode.UNKNOWN
        start = time.perf_counter()
        metrics.IN_FLIGHT_REQUESTS.inc()
        try:
            response = await behavior(request, context)
            code = grpc.StatusCode.OK
            return response
        except GatewayError as exc:
            code, message = _status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                logger.error("request_id=%s %s failed: %s", request_id, method, exc, exc_info=exc)
            await context.abort(code, message)
        except grpc.aio.AbortError:
            # Handlers raise GatewayError rather than abort; keep the status of one that did.
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("request_id=%s %s failed unexpectedly", request_id, method)
            await context.abort(code, INTERNAL_MESSAGE)
        finally:
            elapsed = time.perf_counter() - start
            metrics.IN_FLIGHT_REQUESTS.dec()
            observe(code, elapsed)
            # One JSON line per request; the user only as a keyed hash.
            logger.info(
                json.dumps(
                    {
                        "event": "rpc",
                        "request_id": request_id,
                        "method": method,
                        "code": code.name,
                        "latency_ms": round(elapsed * 1000, 3),
                        "user": user_hash(getattr(request, "user_id", ""), user_hash_key),
                        "model_version": metrics.model_version(),
                    }
                )
            )

    return wrapped


def _status_of(exc: GatewayError) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            message = str(exc) if cls in _CALLER_FACING else INTERNAL_MESSAGE
            return STATUS_BY_ERROR[cls], message
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _request_id_of(request: Any) -> str:
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
