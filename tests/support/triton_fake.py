"""An in-process fake of Triton's KServe v2 gRPC inference service, for the tests that run the
real `tritonclient.grpc.aio` transport (wire names, dtypes and shapes; request metadata)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from ltrec_core import contract
from server.app import create_server
from server.config import GatewayConfig
from server.gen.ltrec.v1 import recommender_pb2_grpc
from tests.support.gateway import write_repository

_NUMPY_DTYPES = {"INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}


class FakeTritonService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's KServe v2 gRPC surface, enough for ModelReady, ModelInfer and ModelStreamInfer."""

    def __init__(self) -> None:
        self.requests: list[service_pb2.ModelInferRequest] = []
        # The gRPC metadata of each ModelInfer (`traceparent` when the gateway traces).
        self.metadata: list[dict[str, str | bytes]] = []
        # Requests that came on ModelStreamInfer streams, and how many streams were opened.
        self.stream_requests: list[service_pb2.ModelInferRequest] = []
        self.streams_opened = 0

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        return service_pb2.ModelReadyResponse(ready=request.name == contract.ENSEMBLE_MODEL)

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata() or ()))
        return self.answer(request)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[service_pb2.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """As Triton for a model that is not decoupled: one answer per request, in order."""
        self.streams_opened += 1
        async for request in request_iterator:
            self.stream_requests.append(request)
            yield service_pb2.ModelStreamInferResponse(infer_response=self.answer(request))

    def answer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        inputs = self.decode(request)
        top_k = int(inputs[contract.TOP_K].reshape(-1)[0])
        # every reason: the oldest history item (the first after the left padding)
        oldest = int(np.argmax(inputs[contract.HISTORY_ITEMS][0] != contract.PADDING_INDEX))
        tensors = {
            contract.TOP_ITEMS: np.arange(1, top_k + 1, dtype=np.int64)[::-1].reshape(1, top_k),
            contract.TOP_SCORES: np.linspace(1, 0, top_k, dtype=np.float32).reshape(1, top_k),
            contract.REASON_POSITIONS: np.full((1, top_k), oldest, dtype=np.int64),
        }
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, array in tensors.items():
            datatype = "INT64" if array.dtype == np.int64 else "FP32"
            response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
        return response

    @staticmethod
    def decode(request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
        return {
            tensor.name: np.frombuffer(raw, dtype=_NUMPY_DTYPES[tensor.datatype]).reshape(
                list(tensor.shape)
            )
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }


@contextlib.asynccontextmanager
async def gateway_over_fake_triton(
    tmp_path: Path, **config: Any
) -> AsyncIterator[tuple[recommender_pb2_grpc.RecommenderStub, FakeTritonService]]:
    """A whole gateway (`config` on top of the plaintext test settings) in front of a
    `FakeTritonService` served over real gRPC: the gateway's stub and the fake."""
    triton = grpc.aio.server()
    fake = FakeTritonService()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, triton)
    triton_port = triton.add_insecure_port("127.0.0.1:0")
    await triton.start()
    settings: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "model_repository": write_repository(tmp_path / "model_repository"),
        "triton_url": f"127.0.0.1:{triton_port}",
        "allow_plaintext": True,
        "feedback_dir": tmp_path / "feedback",
        "items_dir": tmp_path / "items",
        "history_sqlite_path": tmp_path / "history" / "history.sqlite3",
    }
    server, port = create_server(GatewayConfig(**{**settings, **config}))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield recommender_pb2_grpc.RecommenderStub(channel), fake
    finally:
        await server.stop(None)
        await triton.stop(None)
