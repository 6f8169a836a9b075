"""Coalescing of concurrent ranking calls: one Triton call of B rows instead of B calls of one.

Triton's dynamic batcher already stacks concurrent requests of one shape, but each request still
costs the gateway one gRPC call to Triton: tritonclient's conversions, a channel call and its
event-loop callbacks, which a profile of the gateway put at most of its Python time. Here the
Recommend and SimilarItems calls that reach Triton at the same time and share their tensor shapes
(`server.features` pads them to a few buckets) go as one call of up to `max_rows` rows, and each
request gets its row of the outputs back.

Nothing waits for company: a call goes out at once while fewer than `max_in_flight` calls of its
shape are in flight, and only the requests that arrive meanwhile are gathered, each gathered batch
sent as soon as one of those calls returns. At low load every call goes alone, as before.

Every request keeps its own deadline: the batch's call runs under the latest deadline of its rows
(and the configured Triton timeout), and each request stops waiting at its own, with
`BackendTimeout`, without failing the others. A failed call fails only the requests of its batch,
each with the error the call alone would have raised. The scorer returns the batch's largest k;
each request keeps its own first k (`server.postprocess`), as it does for Triton's own batches.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ltrec_core import contract
from server import metrics
from server.errors import BackendError, BackendTimeout, GatewayError
from server.triton_client import OUTPUT_NAMES, PER_RPC_RETRY_BUFFER_BYTES, TritonClient

# The models whose calls are coalesced: one row per request, batching ensembles.
COALESCED_MODELS = (contract.ENSEMBLE_MODEL, contract.SIMILAR_ITEMS_MODEL)
# A gathered batch stays small enough for gRPC to keep a copy to retry (a single request larger
# than this still goes, alone).
MAX_BATCH_BYTES = PER_RPC_RETRY_BUFFER_BYTES

# (model, output names, each input's name, dtype and shape after the batch dimension)
_Key = tuple[str, tuple[str, ...], tuple[tuple[str, str, tuple[int, ...]], ...]]


@dataclass(eq=False)
class _Waiting:
    inputs: Mapping[str, np.ndarray]
    deadline: float | None
    request_id: str
    nbytes: int
    future: asyncio.Future[dict[str, np.ndarray]]
    # The request's context (its trace span): the batch's call runs in its first row's.
    context: contextvars.Context


@dataclass(eq=False)
class _Lane:
    """The calls of one shape: how many are in flight, and the requests waiting for a slot."""

    in_flight: int = 0
    waiting: deque[_Waiting] = field(default_factory=deque)


class Coalescer:
    """`TritonClient.infer` for the ranking ensembles, coalescing concurrent calls of one shape.

    `max_rows` is the largest batch (the ensembles' max_batch_size); `max_in_flight` the calls of
    one shape in flight at once before further requests wait to be gathered."""

    def __init__(
        self,
        triton: TritonClient,
        *,
        max_rows: int = contract.MAX_BATCH_SIZE,
        max_in_flight: int = 1,
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        if not 1 <= max_rows <= contract.MAX_BATCH_SIZE:
            raise ValueError(f"max_rows must be in [1, {contract.MAX_BATCH_SIZE}], got {max_rows}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._triton = triton
        self._max_rows = max_rows
        self._max_in_flight = max_in_flight
        self._max_batch_bytes = max_batch_bytes
        self._lanes: dict[_Key, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._rows = {
            model: metrics.TRITON_BATCH_ROWS.labels(model=model) for model in COALESCED_MODELS
        }

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        deadline: float | None,
        request_id: str,
        model_name: str = contract.ENSEMBLE_MODEL,
        output_names: Sequence[str] = OUTPUT_NAMES,
    ) -> dict[str, np.ndarray]:
        """As `TritonClient.infer`, for inputs of one row each ([1, ...]); outputs [1, ...]."""
        key = _key(model_name, output_names, inputs)

        def alone() -> Awaitable[dict[str, np.ndarray]]:
            return self._triton.infer(
                inputs,
                deadline=deadline,
                request_id=request_id,
                model_name=model_name,
                output_names=output_names,
            )

        if key is None:
            return await alone()
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if lane.in_flight < self._max_in_flight and not lane.waiting:
            # A free slot: this call goes now, alone, from the request's own task.
            lane.in_flight += 1
            try:
                self._rows[model_name].observe(1)
                return await alone()
            finally:
                lane.in_flight -= 1
                self._dispatch(key, lane)
        return await self._wait(key, lane, inputs, deadline, request_id)

    async def _wait(
        self,
        key: _Key,
        lane: _Lane,
        inputs: Mapping[str, np.ndarray],
        deadline: float | None,
        request_id: str,
    ) -> dict[str, np.ndarray]:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise BackendTimeout("deadline exceeded before the model was called")
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        nbytes = sum(array.nbytes for array in inputs.values())
        lane.waiting.append(
            _Waiting(inputs, deadline, request_id, nbytes, future, contextvars.copy_context())
        )
        try:
            # Its own deadline: leaving cancels the future, and a batch skips or ignores it.
            async with asyncio.timeout(remaining):
                return await future
        except TimeoutError:
            raise BackendTimeout(
                f"model call timed out after {remaining:.3f} s (deadline)"
            ) from None
        finally:
            self._forget_if_idle(key, lane)

    def _dispatch(self, key: _Key, lane: _Lane) -> None:
        """Sends what waits in `lane`, in batches, while it has free slots."""
        while lane.in_flight < self._max_in_flight and lane.waiting:
            batch = self._take(lane.waiting)
            if not batch:
                break
            lane.in_flight += 1
            task = asyncio.get_running_loop().create_task(
                self._run(key, lane, batch), context=batch[0].context
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._forget_if_idle(key, lane)

    def _forget_if_idle(self, key: _Key, lane: _Lane) -> None:
        """Shapes come and go (the overlay grows): a lane lives while it has calls."""
        if not lane.in_flight and not lane.waiting and self._lanes.get(key) is lane:
            del self._lanes[key]

    def _take(self, waiting: deque[_Waiting]) -> list[_Waiting]:
        """Up to max_rows of the oldest still waiting, within max_batch_bytes (one at least)."""
        batch: list[_Waiting] = []
        nbytes = 0
        while waiting and len(batch) < self._max_rows:
            head = waiting[0]
            if head.future.done():  # its deadline passed, or its RPC was cancelled
                waiting.popleft()
                continue
            if batch and nbytes + head.nbytes > self._max_batch_bytes:
                break
            waiting.popleft()
            batch.append(head)
            nbytes += head.nbytes
        return batch

    async def _run(self, key: _Key, lane: _Lane, batch: list[_Waiting]) -> None:
        model_name, output_names, _ = key
        try:
            self._rows[model_name].observe(len(batch))
            deadlines = [w.deadline for w in batch]
            outputs = await self._triton.infer(
                _stacked(batch),
                # The latest: each request still stops at its own (`_wait`).
                deadline=None if None in deadlines else max(d for d in deadlines if d is not None),
                request_id=batch[0].request_id,
                model_name=model_name,
                output_names=output_names,
            )
            rows = _split(outputs, output_names, len(batch))
        except asyncio.CancelledError:
            for waiting in batch:
                waiting.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001  (every request of the batch gets it)
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(_own_copy(exc))
        else:
            for waiting, row in zip(batch, rows, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(row)
        finally:
            lane.in_flight -= 1
            self._dispatch(key, lane)


def _key(
    model_name: str, output_names: Sequence[str], inputs: Mapping[str, np.ndarray]
) -> _Key | None:
    """The shape key of a one-row call of a coalesced model; None for anything else."""
    if model_name not in COALESCED_MODELS:
        return None
    shapes = []
    for name, array in inputs.items():
        if array.ndim == 0 or array.shape[0] != 1:
            return None
        shapes.append((name, array.dtype.str, array.shape[1:]))
    return model_name, tuple(output_names), tuple(shapes)


def _stacked(batch: list[_Waiting]) -> Mapping[str, np.ndarray]:
    if len(batch) == 1:
        return batch[0].inputs
    return {name: np.concatenate([w.inputs[name] for w in batch]) for name in batch[0].inputs}


def _split(
    outputs: Mapping[str, np.ndarray], output_names: Sequence[str], rows: int
) -> list[dict[str, np.ndarray]]:
    """Row i of every output, [1, ...] as a call of one row answers."""
    for name in output_names:
        array = outputs.get(name)
        if array is None:
            raise BackendError(f"ensemble output {name} is missing")
        if array.ndim == 0 or array.shape[0] != rows:
            raise BackendError(
                f"ensemble output {name} has shape {array.shape} for a batch of {rows} rows"
            )
    return [{name: outputs[name][i : i + 1] for name in output_names} for i in range(rows)]


def _own_copy(exc: Exception) -> Exception:
    """An exception per request (each raise adds to its traceback), the original as its cause."""
    if isinstance(exc, GatewayError):
        try:
            copy = type(exc)(*exc.args)
        except TypeError:
            return exc
        copy.__cause__ = exc
        return copy
    return exc
