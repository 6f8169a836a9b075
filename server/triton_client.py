"""A thin async client for the Triton ensemble, holding the deadline and retry policy.

`TritonTransport` is the narrow surface of `tritonclient.grpc.aio` the gateway uses (numpy in,
numpy out, `InferenceServerException` on failure); tests inject a fake transport and exercise the
real policy in `TritonClient`. Load spreading and retries live in the channel's gRPC service config
(`service_config`): `round_robin` over every address the Triton target resolves to (each pod of
the chart's headless Service), and gRPC's own retry of UNAVAILABLE, which re-picks the next pod and
never runs past the call's deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import (
    InferenceServerException,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from ltrec_core import contract
from server import metrics, tracing
from server.errors import BackendError, BackendTimeout, BackendUnavailable

logger = logging.getLogger(__name__)

OUTPUT_NAMES = (contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS)
# Triton's gRPC service and the one method retried: inference is idempotent; the readiness poll is
# not retried (it is a poll, repeated anyway).
TRITON_SERVICE = "inference.GRPCInferenceService"
RETRIED_METHOD = "ModelInfer"
# gRPC caps a retry policy's attempts at 5: the first one and at most 4 retries.
MAX_RETRIES = 4
MIN_BACKOFF_SECONDS = 0.001
MAX_BACKOFF_SECONDS = 1.0
# A request larger than this is not retried (gRPC keeps a copy of each request until its answer
# starts, to resend it); image batches for the image encoder stay below it.
PER_RPC_RETRY_BUFFER_BYTES = 16 * 1024 * 1024
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


def service_config(*, retries: int, backoff_seconds: float) -> dict[str, Any]:
    """The Triton channel's service config. `round_robin` sends each call to the next ready
    address of the target (`dns:///` of a headless Service resolves to every ready pod); with a
    single address it behaves as gRPC's default. `retries` > 0 adds gRPC's retry policy for
    inference: UNAVAILABLE only, at most `retries` more attempts, jittered exponential backoff from
    `backoff_seconds` capped at a second, all within the call's own deadline."""
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be in [0, {MAX_RETRIES}], got {retries}")
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries:
        config["methodConfig"] = [
            {
                "name": [{"service": TRITON_SERVICE, "method": RETRIED_METHOD}],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": _duration(backoff_seconds),
                    "maxBackoff": _duration(max(MAX_BACKOFF_SECONDS, backoff_seconds)),
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config


def channel_args(*, retries: int, backoff_seconds: float) -> list[tuple[str, Any]]:
    """`CHANNEL_ARGS` plus the service config (`service_config`) and retry buffer."""
    config = service_config(retries=retries, backoff_seconds=backoff_seconds)
    return [
        *CHANNEL_ARGS,
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", PER_RPC_RETRY_BUFFER_BYTES),
    ]


def _duration(seconds: float) -> str:
    """A protobuf JSON duration ("0.050000s"); gRPC rejects a zero backoff."""
    if not MIN_BACKOFF_SECONDS <= seconds <= 3600:
        raise ValueError(f"backoff_seconds must be in [{MIN_BACKOFF_SECONDS}, 3600], got {seconds}")
    return f"{seconds:.6f}s"


@dataclass(frozen=True)
class ModelIdentity:
    """Which export a repository is: its version label and the hash of its files."""

    model_version: str
    content_hash: str

    def short(self) -> str:
        return f"{self.model_version or '?'} ({self.content_hash[:12] or 'no content hash'})"


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

    async def model_parameters(
        self, model_name: str, *, client_timeout: float
    ) -> dict[str, str]: ...

    async def close(self) -> None: ...


def result_outputs(result: InferResult, output_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named outputs of a Triton answer as arrays; an output it lacks is an error."""
    outputs: dict[str, np.ndarray] = {}
    for name in output_names:
        array = result.as_numpy(name)
        if array is None:
            raise InferenceServerException(f"output {name} missing from the response")
        outputs[name] = array
    return outputs


def infer_request(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    request_id: str,
) -> service_pb2.ModelInferRequest:
    """The `ModelInferRequest` tritonclient would build: raw tensor contents, C order."""
    request = service_pb2.ModelInferRequest(model_name=model_name, id=request_id)
    for name, array in inputs.items():
        datatype = np_to_triton_dtype(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            serialized = serialize_byte_tensor(array)
            request.raw_input_contents.append(serialized.item() if serialized.size else b"")
        else:
            request.raw_input_contents.append(array.tobytes())
    for name in output_names:
        request.outputs.add(name=name)
    return request


def response_outputs(
    response: service_pb2.ModelInferResponse, output_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The named outputs of a `ModelInferResponse` as arrays (what `InferResult.as_numpy` reads,
    without its per-name scan); an output it lacks is an error."""
    positions = {output.name: i for i, output in enumerate(response.outputs)}
    outputs: dict[str, np.ndarray] = {}
    for name in output_names:
        i = positions.get(name)
        if i is None or i >= len(response.raw_output_contents):
            raise InferenceServerException(f"output {name} missing from the response")
        tensor = response.outputs[i]
        if tensor.datatype == "BYTES":  # never in our models; tritonclient knows the layout
            return result_outputs(InferResult(response), output_names)
        dtype = triton_to_np_dtype(tensor.datatype)
        if dtype is None:
            raise InferenceServerException(f"output {name} has unknown datatype {tensor.datatype}")
        outputs[name] = np.frombuffer(response.raw_output_contents[i], dtype=dtype).reshape(
            tensor.shape
        )
    return outputs


def rpc_exception(error: grpc.RpcError) -> InferenceServerException:
    """A gRPC error as tritonclient raises it: `status` is `StatusCode.<NAME>`."""
    if not isinstance(error, grpc.aio.AioRpcError):  # the aio channel raises only these
        return InferenceServerException(str(error), status="StatusCode.UNKNOWN")
    return InferenceServerException(
        error.details() or "", status=str(error.code()), debug_details=error.debug_error_string()
    )


class GrpcTritonTransport:
    """The production transport: Triton's gRPC service (`tritonclient`'s generated stub) on one
    channel to `url`, any gRPC target (`host:port`, `dns:///name:port`, `ipv4:a:p,b:p`), spread
    and retried by `service_config`. Requests and answers are built and read here, as
    tritonclient's client would (`infer_request`, `response_outputs`), without its per-call
    objects (its conversions were 13 % of the gateway's Python time per Recommend in a py-spy
    profile; built here: the same p50 at concurrency 1, 3 % more req/s at 32,
    `benchmarks.gateway_ab`, 2026-12-07)."""

    def __init__(self, url: str, *, retries: int = 0, backoff_seconds: float = 0.05) -> None:
        self._channel = grpc.aio.insecure_channel(
            url, options=channel_args(retries=retries, backoff_seconds=backoff_seconds)
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def infer(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        *,
        client_timeout: float,
        request_id: str,
    ) -> dict[str, np.ndarray]:
        request = infer_request(model_name, inputs, output_names, request_id)
        # The current (Triton attempt) span as `traceparent`: Triton's traces join ours.
        headers = tracing.outgoing_headers()
        try:
            response = await self._stub.ModelInfer(
                request,
                metadata=tuple(headers.items()) if headers else None,
                timeout=client_timeout,
            )
        except grpc.RpcError as exc:
            raise rpc_exception(exc) from None
        return response_outputs(response, output_names)

    async def is_model_ready(self, model_name: str, *, client_timeout: float) -> bool:
        try:
            response = await self._stub.ModelReady(
                service_pb2.ModelReadyRequest(name=model_name), timeout=client_timeout
            )
        except grpc.RpcError as exc:
            raise rpc_exception(exc) from None
        return bool(response.ready)

    async def model_parameters(self, model_name: str, *, client_timeout: float) -> dict[str, str]:
        """The string parameters of the model's configuration as Triton serves it."""
        try:
            response = await self._stub.ModelConfig(
                service_pb2.ModelConfigRequest(name=model_name), timeout=client_timeout
            )
        except grpc.RpcError as exc:
            raise rpc_exception(exc) from None
        return {k: v.string_value for k, v in response.config.parameters.items()}

    async def close(self) -> None:
        await self._channel.close()


class TritonClient:
    """Calls Triton under the caller's deadline and turns failures into the gateway's errors.

    Retries of UNAVAILABLE happen below, in the channel (`service_config`): bounded, jittered and
    inside the deadline given here, each one re-picking the next Triton address."""

    def __init__(self, transport: TritonTransport, *, timeout_seconds: float) -> None:
        self._transport = transport
        self._timeout_seconds = timeout_seconds

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
        `timeout_seconds` replaces the configured per-call timeout (the item text encoder).
        The smaller of the two bounds the call, its retries included."""
        timeout = self._call_timeout(deadline, timeout_seconds)
        if timeout is None:
            raise BackendTimeout("deadline exceeded before the model was called")
        try:
            with (
                tracing.triton_span(model_name),
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
            if code == "UNAVAILABLE":
                raise BackendUnavailable("the model server is unavailable") from exc
            raise BackendError(f"Triton answered {code}: {exc.message()}") from exc
        except OSError as exc:
            metrics.TRITON_ERRORS_TOTAL.labels(code="UNAVAILABLE").inc()
            raise BackendUnavailable("the model server is unavailable") from exc

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

    async def served_identity(self) -> ModelIdentity | None:
        """The model version and content hash the ensemble Triton serves carries (empty strings
        where its config has none); None when Triton could not be asked (a poll, as readiness)."""
        try:
            async with asyncio.timeout(self._timeout_seconds):
                parameters = await self._transport.model_parameters(
                    contract.ENSEMBLE_MODEL, client_timeout=self._timeout_seconds
                )
        except (TimeoutError, InferenceServerException, OSError) as exc:
            logger.debug("Triton model configuration request failed: %s", exc)
            return None
        return ModelIdentity(
            parameters.get(contract.MODEL_VERSION_PARAMETER, ""),
            parameters.get(contract.CONTENT_HASH_PARAMETER, ""),
        )

    async def close(self) -> None:
        await self._transport.close()

    def _call_timeout(
        self, deadline: float | None, timeout_seconds: float | None = None
    ) -> float | None:
        configured = self._timeout_seconds if timeout_seconds is None else timeout_seconds
        if deadline is None:
            return configured
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        return min(configured, remaining)


def status_code(exc: InferenceServerException) -> str:
    """`StatusCode.UNAVAILABLE` (tritonclient's grpc form) -> `UNAVAILABLE`."""
    status = exc.status() or "UNKNOWN"
    return str(status).rsplit(".", 1)[-1].upper()
