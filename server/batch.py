"""RecommendBatch: many Recommend requests over one stream, answered through a bounded window.

Each request is answered by the single Recommend's pipeline (the servicer passes it in), and an
error becomes an inline status by the one table of `server.interceptors`, so that one bad request
never fails the stream. Two bounds hold the work: the window, requests of one stream read and not
yet answered (the stream is not read while it is full, so gRPC's flow control holds the sender
back and the gateway never holds more than window requests and answers of a stream), and the
gateway-wide limit on requests of all streams in the pipeline at once (so that batch streams
cannot take all of Triton from online calls).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from server import metrics
from server.errors import InvalidArgument
from server.gen.ltrec.v1 import recommender_pb2
from server.hashing import user_hash
from server.interceptors import current_request_id, failure_status, request_id_of

logger = logging.getLogger(__name__)

METHOD = "RecommendBatch"

# (request, its request id) -> its answer; raises a GatewayError like a Recommend.
Answer = Callable[
    [recommender_pb2.RecommendRequest, str], Awaitable[recommender_pb2.RecommendResponse]
]


@dataclass(frozen=True)
class BatchLimits:
    # Requests of one stream read and not yet answered.
    window: int = 16
    # Requests of all streams in the pipeline at once.
    max_in_flight: int = 64
    # Requests taken from one stream; one more ends the stream INVALID_ARGUMENT.
    max_requests: int = 10_000


class _End:
    """Put on the answer queue when the stream has been read to its end (or failed)."""


_END = _End()


class BatchRunner:
    """Answers RecommendBatch streams; one per gateway (it holds the gateway-wide limit)."""

    def __init__(self, limits: BatchLimits, user_hash_key: bytes) -> None:
        self._limits = limits
        self._user_hash_key = user_hash_key
        self._pipeline_slots = asyncio.Semaphore(limits.max_in_flight)

    async def run(
        self, stream: AsyncIterator[recommender_pb2.RecommendBatchRequest], answer: Answer
    ) -> AsyncIterator[recommender_pb2.RecommendBatchResponse]:
        """Yields one answer per request read, in completion order; then raises InvalidArgument
        if the stream held more requests than the limit (after answering the ones taken)."""
        window = asyncio.Semaphore(self._limits.window)
        answers: asyncio.Queue[recommender_pb2.RecommendBatchResponse | _End] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        started = 0

        async def read() -> None:
            nonlocal started
            try:
                while True:
                    await window.acquire()  # before reading: at most `window` held
                    try:
                        message = await anext(stream)
                    except StopAsyncIteration:
                        return
                    if started == self._limits.max_requests:
                        most = self._limits.max_requests
                        raise InvalidArgument(
                            f"a RecommendBatch stream must have at most {most} requests, got "
                            f"more: the first {most} were answered, send the rest on a new stream"
                        )
                    await self._pipeline_slots.acquire()
                    task = asyncio.create_task(self._one(started, message, answer, answers))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    started += 1
            finally:
                answers.put_nowait(_END)

        reader = asyncio.create_task(read())
        answered = 0
        ended = False
        try:
            while not ended or answered < started:
                item = await answers.get()
                if isinstance(item, _End):
                    ended = True
                    continue
                answered += 1
                yield item
                window.release()  # only once it is handed to gRPC
            await reader  # its error (too many requests, a broken stream) ends the RPC
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _one(
        self,
        index: int,
        message: recommender_pb2.RecommendBatchRequest,
        answer: Answer,
        answers: asyncio.Queue[recommender_pb2.RecommendBatchResponse | _End],
    ) -> None:
        request = message.request
        request_id = request_id_of(request)
        start = time.perf_counter()
        metrics.BATCH_REQUESTS_IN_FLIGHT.inc()
        try:
            if not message.HasField("request"):
                raise InvalidArgument("request must be set (the RecommendRequest to answer)")
            response = await answer(request, request_id)
        except Exception as exc:
            code, why = failure_status(exc, METHOD, request_id)
            result = recommender_pb2.RecommendBatchResponse(
                index=index,
                request_id=request_id,
                error=recommender_pb2.RecommendBatchError(code=code.value[0], message=why),
            )
        else:
            code = grpc.StatusCode.OK
            result = recommender_pb2.RecommendBatchResponse(
                index=index, request_id=request_id, response=response
            )
        finally:
            metrics.BATCH_REQUESTS_IN_FLIGHT.dec()
            self._pipeline_slots.release()
        metrics.BATCH_REQUESTS_TOTAL.labels(method=METHOD, code=code.name).inc()
        logger.info(
            "%s[%d] %s",
            METHOD,
            index,
            code.name,
            extra=self._log_fields(index, request_id, code, start, request.user_id),
        )
        answers.put_nowait(result)

    def _log_fields(
        self, index: int, request_id: str, code: grpc.StatusCode, start: float, user_id: str
    ) -> dict[str, Any]:
        """One line per request of a stream, like the access log's; the user only as a keyed
        hash."""
        return {
            "event": "batch_request",
            "request_id": request_id,
            "stream_request_id": current_request_id(),
            "index": index,
            "method": METHOD,
            "code": code.name,
            "latency_ms": round((time.perf_counter() - start) * 1000, 3),
            "user": user_hash(user_id, self._user_hash_key),
            "model_version": metrics.model_version(),
        }
