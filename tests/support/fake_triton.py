"""A fake Triton over real gRPC: Triton's own `GRPCInferenceService` on 127.0.0.1, answering
`ModelInfer` from a script of status codes. The gateway's real channel (service config,
round_robin, gRPC's retries) runs against it, which a `FakeTransport` cannot show."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype

from tests.support.gateway import outputs


@dataclass
class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Fails the first `failures` calls with their codes (then `always`, if set), else answers
    `result`; every `ModelInfer` attempt that reached it is counted in `attempts`."""

    result: Mapping[str, np.ndarray] = field(default_factory=lambda: outputs([3], [1.0], [0]))
    failures: list[grpc.StatusCode] = field(default_factory=list)
    always: grpc.StatusCode | None = None
    attempts: int = 0
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def ModelInfer(  # Triton's method names
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        self.attempts += 1
        code = self.failures.pop(0) if self.failures else self.always
        if code is not None:
            await context.abort(code, f"scripted {code.name}")
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, array in self.result.items():
            response.outputs.add(
                name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape)
            )
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
        return response

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        return service_pb2.ModelReadyResponse(ready=True)


@contextlib.asynccontextmanager
async def serving(*fakes: FakeTriton) -> AsyncIterator[tuple[FakeTriton, ...]]:
    """Each fake on a free port of its own (`fake.address`) until the block ends."""
    servers = []
    try:
        for fake in fakes:
            server = grpc.aio.server()
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
            fake.port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
        yield fakes
    finally:
        for server in servers:
            await server.stop(None)
