"""A thin async client for the Triton ensemble, holding the deadline and retry policy.

`TritonTransport` is the narrow surface of `tritonclient.grpc.aio` the gateway uses (numpy in,
numpy out, `InferenceServerException` on failure); tests inject a fake transport and exercise the
real policy in `TritonClient`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from ltrec_core import contract
from server import metrics, tracing
from server.errors import BackendError, BackendTimeout, BackendUnavailable

logger = logging.getLogger(__name__)

OUTPUT_NAMES = (contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS)
# A retry is not worth starting with less time than this left before the caller's deadline.
MIN_ATTEMPT_SECONDS = 0.01
MAX_BACKOFF_SECONDS = 1.0
# The channel to Triton: tritonclient's message limits, and a reconnect backoff capped at one
# second (gRPC's default grows to two minutes), so that a restarted Triton is found again within
# about a second instead of after the last failed attempt's backoff.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", triton_grpc.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", triton_grpc.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


class TritonTransport(Protocol):
    async def infer(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        *,
        client_timeout: float,
        request_id: str,
    ) -> dict[str, np.ndarray]: ...

    async def is_model_ready(self, model_name: str, *, client_timeout: float) -> bool: ...

    async def close(self) -> None: ...


class GrpcTritonTransport:
    """The production transport over `tritonclient.grpc.aio`."""

    def __init__(self, url: str) -> None:
        self._client = triton_grpc.InferenceServerClient(url=url, channel_args=CHANNEL_ARGS)
        self._outputs: dict[tuple[str, ...], list[InferRequestedOutput]] = {}

    async def infer(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        *,
        client_timeout: float,
        request_id: str,
    ) -> dict[str, np.ndarray]:
        infer_inputs = []
        for name, array in inputs.items():
            infer_input = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            infer_input.set_data_from_numpy(array)
            infer_inputs.append(infer_input)
        key = tuple(output_names)
        requested = self._outputs.get(key)
        if requested is None:  # built once per set of outputs, not per request
            requested = self._outputs[key] = [InferRequestedOutput(name) for name in key]
        result = await self._client.infer(
            model_name,
            infer_inputs,
            outputs=requested,
            request_id=request_id,
            client_timeout=client_timeout,
            # The current (Triton attempt) span as `traceparent`: Triton's traces join ours.
            headers=tracing.outgoing_headers(),
        )
        outputs: dict[str, np.ndarray] = {}
        for name in output_names:
            array = result.as_numpy(name)
            if array is None:
                raise InferenceServerException(f"output {name} missing from the response")
            outputs[name] = array
        return outputs

    async def is_model_ready(self, model_name: str, *, client_timeout: float) -> bool:
        return bool(await self._client.is_model_ready(model_name, client_timeout=client_timeout))

    async def close(self) -> None:
        await self._client.close()


class TritonClient:
    """Calls the ensemble under the caller's deadline; retries only UNAVAILABLE, a bounded number
    of times, with jittered exponential backoff that never runs past the deadline."""

    def __init__(
        self,
        transport: TritonTransport,
        *,
        timeout_seconds: float,
        retries: int,
        backoff_seconds: float,
    ) -> None:
        self._transport = transport
        self._timeout_seconds = timeout_seconds
        self._retries = retries
        self._backoff_seconds = backoff_seconds

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        deadline: float | None,
        request_id: str,
        model_name: str = contract.ENSEMBLE_MODEL,
        output_names: Sequence[str] = OUTPUT_NAMES,
        timeout_seconds: float | None = None,
    ) -> dict[str, np.ndarray]:
        """`deadline` is the caller's, in `time.monotonic()` seconds (None: no deadline);
        `timeout_seconds` replaces the configured per-call timeout (the item text encoder)."""
        attempt = 0
        while True:
            timeout = self._attempt_timeout(deadline, timeout_seconds)
            if timeout is None:
                raise BackendTimeout("deadline exceeded before the model was called")
            try:
                with (
                    tracing.triton_span(model_name, attempt),
                    metrics.TRITON_REQUEST_DURATION_SECONDS.time(),
                ):
                    async with asyncio.timeout(timeout):
                        return await self._transport.infer(
                            model_name,
                            inputs,
                            output_names,
                            client_timeout=timeout,
                            request_id=request_id,
                        )
            except TimeoutError:
                metrics.TRITON_ERRORS_TOTAL.labels(code="DEADLINE_EXCEEDED").inc()
                raise BackendTimeout(f"model call timed out after {timeout:.3f} s") from None
            except InferenceServerException as exc:
                code = status_code(exc)
                metrics.TRITON_ERRORS_TOTAL.labels(code=code).inc()
                if code == "DEADLINE_EXCEEDED":
                    raise BackendTimeout(f"model call timed out after {timeout:.3f} s") from exc
                if code == "NOT_FOUND":  # the model is not loaded (yet): not ready
                    raise BackendUnavailable(f"{model_name} is not loaded in Triton") from exc
                if code != "UNAVAILABLE":
                    raise BackendError(f"Triton answered {code}: {exc.message()}") from exc
                failure: Exception = exc
            except OSError as exc:
                metrics.TRITON_ERRORS_TOTAL.labels(code="UNAVAILABLE").inc()
                failure = exc
            if attempt >= self._retries or not await self._backoff(attempt, deadline):
                raise BackendUnavailable("the model server is unavailable") from failure
            attempt += 1
            metrics.TRITON_RETRIES_TOTAL.inc()
            logger.debug("retrying Triton after UNAVAILABLE (attempt %d)", attempt + 1)

    async def is_ensemble_ready(self) -> bool:
        """False on any failure: readiness is a poll, not a request to report errors for."""
        try:
            async with asyncio.timeout(self._timeout_seconds):
                return await self._transport.is_model_ready(
                    contract.ENSEMBLE_MODEL, client_timeout=self._timeout_seconds
                )
        except (TimeoutError, InferenceServerException, OSError) as exc:
            logger.debug("Triton readiness check failed: %s", exc)
            return False

    async def close(self) -> None:
        await self._transport.close()

    def _attempt_timeout(
        self, deadline: float | None, timeout_seconds: float | None = None
    ) -> float | None:
        configured = self._timeout_seconds if timeout_seconds is None else timeout_seconds
        if deadline is None:
            return configured
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        return min(configured, remaining)

    async def _backoff(self, attempt: int, deadline: float | None) -> bool:
        """Sleeps before a retry; False when the retry could not finish before the deadline."""
        delay = random.uniform(0, min(MAX_BACKOFF_SECONDS, self._backoff_seconds * 2**attempt))
        if deadline is not None and time.monotonic() + delay + MIN_ATTEMPT_SECONDS >= deadline:
            return False
        await asyncio.sleep(delay)
        return True


def status_code(exc: InferenceServerException) -> str:
    """`StatusCode.UNAVAILABLE` (tritonclient's grpc form) -> `UNAVAILABLE`."""
    status = exc.status() or "UNKNOWN"
    return str(status).rsplit(".", 1)[-1].upper()
