"""Triton inference over `ModelStreamInfer`: many calls multiplexed on a few long-lived streams.

A unary `ModelInfer` costs the gateway a whole gRPC call each time (call object, metadata,
status, a round of event-loop callbacks); on an open bidirectional stream a call is one message
written and one read. Each request goes out tagged with an id unique on its stream and its answer
is matched back by that id (Triton copies the request's id into `infer_response.id`). For a model
that is not decoupled Triton answers one stream's requests in the order it read them, so a slow
call delays the answers behind it: every model gets streams of its own.

- Each caller keeps its own deadline; an answer that comes after it is dropped.
- An error answer carries a message but no status code (`error_message`); older Tritons also
  clear its id, which the order of the answers then recovers. `StreamingTritonTransport` asks a
  failed call again as one unary call, which carries Triton's status code (NOT_FOUND for a model
  not loaded is "unavailable", not an internal error) and gRPC's retries.
- A broken stream (Triton stopped, the connection lost) fails every call in flight on it with
  UNAVAILABLE, naming the cause, and the next call opens a new one; nothing is retried here.
- A stream is replaced once older than `max_age_seconds`: Triton's `--grpc-max-connection-age`
  (the chart: 60 s, then 30 s of grace) would otherwise cut it with calls in flight, and a new
  stream is where round_robin can pick another Triton pod. The old one finishes the calls it
  carries and is then cancelled.
- With tracing on, every call is unary: a stream has one set of gRPC metadata, so the per-call
  `traceparent` that joins Triton's spans to the gateway's cannot travel on it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, cast

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from server import tracing
from server.config import MAX_TRITON_STREAMS
from server.triton_client import TritonTransport, channel_args, infer_request, response_outputs

logger = logging.getLogger(__name__)

UNAVAILABLE = "StatusCode.UNAVAILABLE"
DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"
# Why a stream ended when nothing went wrong (not logged as a failure).
CLOSED = "the stream to Triton was closed"
RETIRED = "the stream to Triton was replaced"


class StreamCall(Protocol):
    """The part of a `grpc.aio.StreamStreamCall` a stream uses (tests pass a fake)."""

    async def write(self, request: service_pb2.ModelInferRequest) -> None: ...

    async def read(self) -> object: ...  # a ModelStreamInferResponse, or grpc.aio.EOF

    def cancel(self) -> bool: ...


class AnsweredWithError(InferenceServerException):
    """Triton answered the call on the stream with an error message (and no status code)."""


class InferStream:
    """One `ModelStreamInfer` call carrying many requests, each answered to its own caller.

    A writer task sends the requests in order (a caller's cancellation never interrupts a
    write, which would cancel the whole stream); a reader task hands each answer to the caller
    waiting for its id."""

    def __init__(self, call: StreamCall, *, name: str = "stream") -> None:
        self.opened = time.monotonic()
        self._call = call
        self._name = name
        self._ids = itertools.count(1)
        # The callers waiting, by request id; written in the order they were added.
        self._pending: dict[str, asyncio.Future[service_pb2.ModelInferResponse]] = {}
        # Ids written whose answers have not come, oldest first (an answer without an id is the
        # oldest's: Triton answers a stream's requests in order).
        self._sent: deque[str] = deque()
        self._outbox: asyncio.Queue[service_pb2.ModelInferRequest] = asyncio.Queue()
        self._failure: str | None = None
        self._retiring = False
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_all(), name=f"{name}-writer")
        self._reader = loop.create_task(self._read_all(), name=f"{name}-reader")

    @property
    def usable(self) -> bool:
        """False once broken, closed or retired: new calls go to another stream."""
        return self._failure is None and not self._retiring

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def infer(
        self, request: service_pb2.ModelInferRequest, timeout: float
    ) -> service_pb2.ModelInferResponse:
        """`request`'s answer within `timeout` seconds. Its `id` is replaced by one unique on
        this stream (the caller's id first, for Triton's logs). Raises InferenceServerException:
        UNAVAILABLE when the stream is or becomes broken, DEADLINE_EXCEEDED after `timeout`,
        `AnsweredWithError` when Triton answers with an error."""
        if self._failure is not None:
            raise _unavailable(self._failure)
        request_id = f"{request.id}#{next(self._ids)}"
        request.id = request_id
        future: asyncio.Future[service_pb2.ModelInferResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[request_id] = future
        self._outbox.put_nowait(request)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise InferenceServerException(
                f"no answer from Triton within {timeout:.3f} s", status=DEADLINE_EXCEEDED
            ) from None
        finally:
            if self._pending.get(request_id) is future:
                del self._pending[request_id]
            if self._retiring and not self._pending:
                self._fail(RETIRED)

    def retire(self) -> None:
        """No new calls; cancelled once the calls it carries have their answers (or left)."""
        self._retiring = True
        if not self._pending:
            self._fail(RETIRED)

    def close(self) -> None:
        """Cancels the stream; calls still waiting fail with UNAVAILABLE."""
        self._fail(CLOSED)

    async def wait_closed(self) -> None:
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)

    async def _write_all(self) -> None:
        try:
            while True:
                request = await self._outbox.get()
                if request.id not in self._pending:  # its caller left before it was sent
                    continue
                self._sent.append(request.id)
                await self._call.write(request)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._fail(f"the stream to Triton broke: {exc.code().name}: {exc.details()}")
        except Exception as exc:  # noqa: BLE001  (every waiting call must learn of it)
            self._fail(f"writing to the stream to Triton failed: {type(exc).__name__}: {exc}")

    async def _read_all(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    self._fail("Triton ended the stream")
                    return
                self._deliver(cast(service_pb2.ModelStreamInferResponse, response))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._fail(f"the stream to Triton broke: {exc.code().name}: {exc.details()}")
        except Exception as exc:  # noqa: BLE001
            self._fail(f"reading the stream from Triton failed: {type(exc).__name__}: {exc}")

    def _deliver(self, response: service_pb2.ModelStreamInferResponse) -> None:
        answer = response.infer_response
        request_id = answer.id
        if not request_id and response.error_message and self._sent:
            request_id = self._sent[0]
        if self._sent and self._sent[0] == request_id:
            self._sent.popleft()
        elif request_id in self._sent:  # answered out of order (never for these models)
            self._sent.remove(request_id)
        future = self._pending.pop(request_id, None)
        if future is None or future.done():
            return  # its caller left (its deadline passed): the late answer is dropped
        if response.error_message:
            future.set_exception(AnsweredWithError(response.error_message))
        else:
            future.set_result(answer)

    def _fail(self, reason: str) -> None:
        if self._failure is not None:
            return
        self._failure = reason
        if reason not in (CLOSED, RETIRED):
            logger.warning("%s: %s (%d calls in flight fail)", self._name, reason, self.in_flight)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_unavailable(reason))
        self._pending.clear()
        self._sent.clear()
        self._call.cancel()
        current = asyncio.current_task()
        for task in (self._writer, self._reader):
            if task is not current:
                task.cancel()


def _unavailable(reason: str) -> InferenceServerException:
    return InferenceServerException(reason, status=UNAVAILABLE)


class StreamingTritonTransport:
    """`TritonTransport` whose inference goes over `ModelStreamInfer` streams (`streams` per
    model, calls spread over them in turn), and everything else (readiness, configuration, any
    call while tracing is on, a call Triton answered with an error) over `unary`."""

    def __init__(
        self,
        unary: TritonTransport,
        open_call: Callable[[], StreamCall],
        *,
        streams: int = 1,
        max_age_seconds: float = 20.0,
        on_close: Callable[[], object] | None = None,
    ) -> None:
        if not 1 <= streams <= MAX_TRITON_STREAMS:
            raise ValueError(f"streams must be in [1, {MAX_TRITON_STREAMS}], got {streams}")
        self._unary = unary
        self._open_call = open_call
        self._streams = streams
        self._max_age_seconds = max_age_seconds
        self._on_close = on_close
        self._by_model: dict[str, list[InferStream | None]] = {}
        self._turns: dict[str, itertools.count[int]] = {}
        # Replaced streams still carrying calls; each cancels itself when they are answered.
        self._retired: list[InferStream] = []

    @classmethod
    def connect(
        cls,
        url: str,
        unary: TritonTransport,
        *,
        retries: int,
        backoff_seconds: float,
        streams: int,
        max_age_seconds: float,
    ) -> StreamingTritonTransport:
        """Streams on a channel of their own to `url` (the unary client's options)."""
        channel = grpc.aio.insecure_channel(
            url, options=channel_args(retries=retries, backoff_seconds=backoff_seconds)
        )
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return cls(
            unary,
            stub.ModelStreamInfer,
            streams=streams,
            max_age_seconds=max_age_seconds,
            on_close=channel.close,
        )

    async def infer(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        *,
        client_timeout: float,
        request_id: str,
    ) -> dict[str, np.ndarray]:
        if tracing.enabled():
            return await self._unary.infer(
                model_name,
                inputs,
                output_names,
                client_timeout=client_timeout,
                request_id=request_id,
            )
        start = time.monotonic()
        request = infer_request(model_name, inputs, output_names, request_id)
        try:
            answer = await self._stream(model_name).infer(request, client_timeout)
        except AnsweredWithError:
            # Asked again as one unary call: Triton's answer with its status code.
            remaining = client_timeout - (time.monotonic() - start)
            if remaining <= 0:
                raise InferenceServerException(
                    f"no answer from Triton within {client_timeout:.3f} s",
                    status=DEADLINE_EXCEEDED,
                ) from None
            return await self._unary.infer(
                model_name,
                inputs,
                output_names,
                client_timeout=remaining,
                request_id=request_id,
            )
        return response_outputs(answer, output_names)

    def _stream(self, model_name: str) -> InferStream:
        streams = self._by_model.get(model_name)
        if streams is None:
            streams = self._by_model[model_name] = [None] * self._streams
            self._turns[model_name] = itertools.count()
        slot = next(self._turns[model_name]) % self._streams
        stream = streams[slot]
        if stream is not None and stream.usable:
            if time.monotonic() - stream.opened < self._max_age_seconds:
                return stream
            stream.retire()
            if stream.in_flight:
                self._retired.append(stream)
        self._retired = [old for old in self._retired if old.in_flight]
        stream = streams[slot] = InferStream(
            self._open_call(), name=f"Triton stream {model_name}/{slot}"
        )
        return stream

    async def is_model_ready(self, model_name: str, *, client_timeout: float) -> bool:
        return await self._unary.is_model_ready(model_name, client_timeout=client_timeout)

    async def model_parameters(self, model_name: str, *, client_timeout: float) -> dict[str, str]:
        return await self._unary.model_parameters(model_name, client_timeout=client_timeout)

    async def close(self) -> None:
        streams = [s for group in self._by_model.values() for s in group if s is not None]
        streams += self._retired
        for stream in streams:
            stream.close()
        await asyncio.gather(*(stream.wait_closed() for stream in streams))
        self._by_model.clear()
        self._retired.clear()
        if self._on_close is not None:
            closed = self._on_close()
            if asyncio.iscoroutine(closed):
                await closed
        await self._unary.close()
