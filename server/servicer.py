"""The `ltrec.v1.Recommender` service: validate -> features -> Triton -> postprocess."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc

from server import metrics
from server.catalogue import Catalogue, ModelMetadata
from server.errors import NotFound
from server.features import build_features
from server.feedback import FEEDBACK, SERVED, FeedbackStore
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from server.interceptors import current_request_id
from server.postprocess import build_items
from server.triton_client import TritonClient
from server.validation import (
    RequestLimits,
    validate_feedback_event,
    validate_feedback_events,
    validate_request,
)

SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
# Stage histograms bound once.
_VALIDATE, _FEATURES, _TRITON, _POSTPROCESS = (
    metrics.STAGE_DURATION_SECONDS.labels(stage=stage)
    for stage in ("validate", "features", "triton", "postprocess")
)
# FEEDBACK_TYPE_CLICK -> "click"
FEEDBACK_TYPE_NAMES = {
    value: name.removeprefix("FEEDBACK_TYPE_").lower()
    for name, value in recommender_pb2.FeedbackType.items()
}


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    """Errors are raised as `server.errors` exceptions; the interceptor turns them into statuses."""

    def __init__(
        self,
        metadata: ModelMetadata,
        catalogue: Catalogue,
        triton: TritonClient,
        limits: RequestLimits,
        feedback: FeedbackStore,
    ) -> None:
        self._metadata = metadata
        self._catalogue = catalogue
        self._triton = triton
        self._limits = limits
        self._feedback = feedback

    async def Recommend(
        self,
        request: recommender_pb2.RecommendRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.RecommendResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        request_id = current_request_id()
        with _VALIDATE.time():
            validate_request(request, self._limits)
        served = self._metadata.model_version
        if request.model_version and request.model_version != served:
            raise NotFound(
                f"model_version {request.model_version!r} is not served here (serving {served!r})"
            )
        with _FEATURES.time():
            features = build_features(request, self._metadata, self._catalogue, time.time())
        metrics.SKIPPED_HISTORY_ITEMS_TOTAL.inc(features.skipped_history_items)
        with _TRITON.time():
            outputs = await self._triton.infer(
                features.as_inputs(), deadline=deadline, request_id=request_id
            )
        with _POSTPROCESS.time():
            items = build_items(outputs, features, self._catalogue)
        # The served list goes to the feedback store without waiting for the disk.
        self._feedback.offer(
            {
                "kind": SERVED,
                "request_id": request_id,
                "user_id": request.user_id,
                "items": [item.item_id for item in items],
                "model_version": self._metadata.model_version,
                "timestamp": request.context.timestamp or int(time.time()),
                "device": request.context.device,
                "region": request.context.region,
            }
        )
        return recommender_pb2.RecommendResponse(
            items=items,
            model_version=self._metadata.model_version,
            request_id=request_id,
            skipped_history_items=features.skipped_history_items,
        )

    async def Feedback(
        self,
        request: recommender_pb2.FeedbackRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.FeedbackResponse:
        validate_feedback_event(request.event, "event", self._limits)
        accepted = await self._record([request.event])
        return recommender_pb2.FeedbackResponse(accepted=accepted)

    async def FeedbackBatch(
        self,
        request: recommender_pb2.FeedbackBatchRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.FeedbackBatchResponse:
        validate_feedback_events(request.events, "events", self._limits)
        accepted = await self._record(request.events)
        return recommender_pb2.FeedbackBatchResponse(accepted=accepted)

    async def _record(self, events: Sequence[recommender_pb2.FeedbackEvent]) -> int:
        """Returns once every (validated) event is on disk: all or nothing."""
        now = time.time()
        records = [
            {
                "kind": FEEDBACK,
                "request_id": event.request_id,
                "user_id": event.user_id,
                "item_id": event.item_id,
                "type": FEEDBACK_TYPE_NAMES[event.type],
                "timestamp": event.timestamp or int(now),
                "position": event.position if event.HasField("position") else None,
                "device": event.context.device,
                "region": event.context.region,
                "model_version": self._metadata.model_version,
                "received_at": round(now, 3),
            }
            for event in events
        ]
        await self._feedback.append(records)
        for record in records:
            metrics.FEEDBACK_EVENTS_TOTAL.labels(type=record["type"]).inc()
        return len(records)
