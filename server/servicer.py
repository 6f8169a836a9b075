"""The `ltrec.v1.Recommender` service: validate -> features -> Triton -> postprocess."""

from __future__ import annotations

import time

import grpc

from server import metrics
from server.catalogue import Catalogue, ModelMetadata
from server.features import build_features
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from server.interceptors import current_request_id
from server.postprocess import build_items
from server.triton_client import TritonClient
from server.validation import RequestLimits, validate_request

SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    """Errors are raised as `server.errors` exceptions; the interceptor turns them into statuses."""

    def __init__(
        self,
        metadata: ModelMetadata,
        catalogue: Catalogue,
        triton: TritonClient,
        limits: RequestLimits,
    ) -> None:
        self._metadata = metadata
        self._catalogue = catalogue
        self._triton = triton
        self._limits = limits

    async def Recommend(
        self,
        request: recommender_pb2.RecommendRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.RecommendResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        request_id = current_request_id()
        with metrics.STAGE_DURATION_SECONDS.labels(stage="validate").time():
            validate_request(request, self._limits)
        with metrics.STAGE_DURATION_SECONDS.labels(stage="features").time():
            features = build_features(request, self._metadata, self._catalogue, time.time())
        metrics.SKIPPED_HISTORY_ITEMS_TOTAL.inc(features.skipped_history_items)
        with metrics.STAGE_DURATION_SECONDS.labels(stage="triton").time():
            outputs = await self._triton.infer(
                features.as_inputs(), deadline=deadline, request_id=request_id
            )
        with metrics.STAGE_DURATION_SECONDS.labels(stage="postprocess").time():
            items = build_items(outputs, features, self._catalogue)
        return recommender_pb2.RecommendResponse(
            items=items,
            model_version=self._metadata.model_version,
            request_id=request_id,
            skipped_history_items=features.skipped_history_items,
        )
