"""Load clients over gRPC: straight to the Triton ensemble (`tritonclient.grpc.aio`), and
`Recommend` on the gateway or the naive peer (`grpc.aio`). One channel per run, reused by every
request, as a real client would.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import np_to_triton_dtype

from benchmarks.load import Run, run_async
from ltrec_core import contract
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc

OUTPUTS = (contract.TOP_ITEMS, contract.TOP_SCORES, contract.REASON_POSITIONS)
TIMEOUT_S = 30.0


async def triton_direct(
    url: str,
    tensors: list[dict[str, np.ndarray]],
    concurrency: int,
    *,
    warmup: int = 20,
    keep: int = 0,
    on_start: Callable[[], None] | None = None,
) -> Run:
    """The ensemble called the way the gateway calls it, minus the gateway."""
    client = triton_aio.InferenceServerClient(url)
    outputs = [InferRequestedOutput(name) for name in OUTPUTS]

    async def call(i: int) -> list[int]:
        inputs = []
        for name, array in tensors[i].items():
            infer_input = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)
        result = await client.infer(
            contract.ENSEMBLE_MODEL, inputs, outputs=outputs, client_timeout=TIMEOUT_S
        )
        return result.as_numpy(contract.TOP_ITEMS).reshape(-1).tolist()

    try:
        for i in range(warmup):
            await call(i % len(tensors))
        if on_start is not None:
            on_start()
        return await run_async(call, len(tensors), concurrency, keep=keep)
    finally:
        await client.close()


async def recommend(
    address: str,
    requests: list[recommender_pb2.RecommendRequest],
    concurrency: int,
    *,
    warmup: int = 20,
    keep: int = 0,
    on_start: Callable[[], None] | None = None,
) -> Run:
    """`Recommend` over one channel; answers kept as lists of item ids."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)

        async def call(i: int) -> list[str]:
            reply = await stub.Recommend(requests[i], timeout=TIMEOUT_S)
            return [item.item_id for item in reply.items]

        for i in range(warmup):
            await call(i % len(requests))
        if on_start is not None:
            on_start()
        return await run_async(call, len(requests), concurrency, keep=keep)
