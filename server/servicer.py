"""The `ltrec.v1.Recommender` service: validate -> history -> features -> Triton -> postprocess.

Recommend reads the user's stored history when the request has none (`server.history`);
Feedback adds acknowledged clicks, carts and purchases to it.

Recommend and SimilarItems read one catalogue snapshot per request from the item store (the
trained catalogue plus the items added or hidden since); UpsertItems reads the items' images
(off the event loop) and encodes the items through the Triton image and item encoders, and
DeleteItems hides items, both through the store.

ForgetUser erases a user (`server.forget`): their stored history, and their feedback for every
later retraining.

Recommend's and SimilarItems' business filters (`ItemFilter`) become the scorer's eligibility
mask in the features stage (`server.item_filter`).
RecommendBatch answers a stream of Recommend requests through Recommend's own pipeline, with a
bounded window and each error inline (`server.batch`).

Audience and ForecastDemand score items against the users of the history store, as user vectors
cached per user (`server.user_vectors`), in Triton's audience ensemble (`server.audience`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import grpc

from ltrec_core import contract
from ltrec_core.item_text import PRICE_BUCKETS, ItemFields, item_text
from ltrec_core.records import FeedbackRecord, ServedRecord
from server import metrics
from server.audience import Audiences
from server.batch import BatchRunner
from server.catalogue import Catalogue, ModelMetadata
from server.coalesce import Coalescer
from server.errors import BackendUnavailable, NotFound
from server.features import build_features, build_similar_features, context_buckets, query_indices
from server.forget import UserEraser
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from server.history import SOURCE_NAMES, choose_history, feedback_events, request_events
from server.interceptors import after_response, current_request_id
from server.item_encoder import ItemRow, TritonItemEncoder
from server.item_filter import filter_fields
from server.item_images import ImageProblem, ItemImages, LoadedImage
from server.postprocess import build_items, build_similar_items
from server.stores.feedback import FeedbackStore
from server.stores.history import HistoryStore
from server.stores.items import ItemStore, NewItem
from server.tracing import Stage
from server.triton_client import OUTPUT_NAMES, TritonClient
from server.validation import (
    RequestLimits,
    max_users,
    validate_audience_request,
    validate_delete_request,
    validate_feedback_event,
    validate_feedback_events,
    validate_forecast_request,
    validate_forget_request,
    validate_request,
    validate_similar_request,
    validate_upsert_request,
)

SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
# Stage histograms (and, with tracing on, spans) bound once.
_VALIDATE, _HISTORY, _FEATURES, _TRITON, _POSTPROCESS, _IMAGES, _ENCODE = (
    Stage(stage)
    for stage in ("validate", "history", "features", "triton", "postprocess", "images", "encode")
)
_HISTORY_SOURCES = {
    value: metrics.RECOMMEND_HISTORY_SOURCE_TOTAL.labels(source=name)
    for value, name in SOURCE_NAMES.items()
}
# FEEDBACK_TYPE_CLICK -> "click"
FEEDBACK_TYPE_NAMES = {
    value: name.removeprefix("FEEDBACK_TYPE_").lower()
    for name, value in recommender_pb2.FeedbackType.items()
}
for _value, _name in FEEDBACK_TYPE_NAMES.items():  # from zero, so rate() sees the first
    if _value != recommender_pb2.FEEDBACK_TYPE_UNSPECIFIED:  # refused by validation
        metrics.FEEDBACK_EVENTS_TOTAL.labels(type=_name)
# PRICE_BUCKET_MID_RANGE -> "mid-range" (the training text's wording), UNSPECIFIED -> ""
PRICE_BUCKET_NAMES = {
    recommender_pb2.PRICE_BUCKET_UNSPECIFIED: "",
    recommender_pb2.PRICE_BUCKET_BUDGET: PRICE_BUCKETS[0],
    recommender_pb2.PRICE_BUCKET_MID_RANGE: PRICE_BUCKETS[1],
    recommender_pb2.PRICE_BUCKET_PREMIUM: PRICE_BUCKETS[2],
}


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    """Errors are raised as `server.errors` exceptions; the interceptor turns them into statuses."""

    def __init__(
        self,
        metadata: ModelMetadata,
        items: ItemStore,
        triton: TritonClient | Coalescer,
        limits: RequestLimits,
        feedback: FeedbackStore,
        encoder: TritonItemEncoder | None,
        images: ItemImages,
        history: HistoryStore | None = None,
        *,
        eraser: UserEraser,
        batch: BatchRunner,
        audiences: Audiences | None = None,
    ) -> None:
        self._history = history
        self._audiences = audiences
        self._eraser = eraser
        self._batch = batch
        self._metadata = metadata
        self._items = items
        self._triton = triton
        self._limits = limits
        self._feedback = feedback
        self._encoder = encoder
        self._images = images

    async def Recommend(
        self,
        request: recommender_pb2.RecommendRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.RecommendResponse:
        return await self._recommend(request, current_request_id(), _deadline(context))

    async def RecommendBatch(
        self,
        requests: AsyncIterator[recommender_pb2.RecommendBatchRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[recommender_pb2.RecommendBatchResponse]:
        deadline = _deadline(context)  # the stream's: every request's Triton call within it

        async def recommend(
            request: recommender_pb2.RecommendRequest, request_id: str
        ) -> recommender_pb2.RecommendResponse:
            return await self._recommend(request, request_id, deadline)

        async for answer in self._batch.run(requests, recommend):
            yield answer

    async def _recommend(
        self, request: recommender_pb2.RecommendRequest, request_id: str, deadline: float | None
    ) -> recommender_pb2.RecommendResponse:
        """One Recommend, from validation to the response; raises `server.errors`."""
        with _VALIDATE.time():
            rows = validate_request(request, self._limits)
        self._check_model_version(request.model_version)
        now = time.time()
        with _HISTORY.time():
            history = await choose_history(request, self._history, now, rows)
        catalogue = self._items.catalogue  # one snapshot for the whole request
        with _FEATURES.time():
            features = build_features(request, self._metadata, catalogue, now, history.events)
        metrics.SKIPPED_HISTORY_ITEMS_TOTAL.inc(features.skipped_history_items)
        with _TRITON.time():
            outputs = await self._triton.infer(
                features.as_inputs(), deadline=deadline, request_id=request_id
            )
        with _POSTPROCESS.time():
            items = build_items(outputs, features, catalogue)
        # The served list goes to the feedback store, and the served items to the metrics, once
        # the answer is on its way (neither changes it).
        after_response(self._served, request, request_id, items)
        if request.remember_history and self._history is not None:
            await self._history.remember(request_events(request, rows), now)
        _HISTORY_SOURCES[history.source].inc()
        return recommender_pb2.RecommendResponse(
            items=items,
            model_version=self._metadata.model_version,
            request_id=request_id,
            skipped_history_items=features.skipped_history_items,
            history_source=history.source,
            history_events=features.history_events,
        )

    def _served(
        self,
        request: recommender_pb2.RecommendRequest,
        request_id: str,
        items: list[recommender_pb2.RecommendedItem],
    ) -> None:
        _count_answer("Recommend", request.filter, request.k, items)
        self._feedback.offer(
            ServedRecord(
                request_id=request_id,
                user_id=request.user_id,
                items=[item.item_id for item in items],
                model_version=self._metadata.model_version,
                timestamp=request.context.timestamp or int(time.time()),
                device=request.context.device,
                region=request.context.region,
            )
        )

    async def SimilarItems(
        self,
        request: recommender_pb2.SimilarItemsRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.SimilarItemsResponse:
        deadline = _deadline(context)
        request_id = current_request_id()
        with _VALIDATE.time():
            validate_similar_request(request, self._limits)
        self._check_model_version(request.model_version)
        catalogue = self._items.catalogue
        with _FEATURES.time():
            query = query_indices(request, catalogue)
            features = build_similar_features(request, self._metadata, catalogue, query)
        metrics.SIMILAR_ITEMS_QUERY_ITEMS.observe(len(query))
        with _TRITON.time():
            outputs = await self._triton.infer(
                features.as_inputs(),
                deadline=deadline,
                request_id=request_id,
                model_name=contract.SIMILAR_ITEMS_MODEL,
                output_names=OUTPUT_NAMES,
            )
        with _POSTPROCESS.time():
            items = build_similar_items(outputs, features, catalogue)
        after_response(_count_answer, "SimilarItems", request.filter, request.k, items)
        return recommender_pb2.SimilarItemsResponse(
            items=items, model_version=self._metadata.model_version, request_id=request_id
        )

    async def UpsertItems(
        self,
        request: recommender_pb2.UpsertItemsRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.UpsertItemsResponse:
        deadline = _deadline(context)
        request_id = current_request_id()
        with _VALIDATE.time():
            validate_upsert_request(request, self._limits)
        if self._encoder is None:
            raise BackendUnavailable(
                "this model repository has no item encoder (no "
                f"{contract.ITEM_ENCODER_MODEL}/{contract.TOKENIZER_DIR}/tokenizer.json): items "
                "cannot be encoded"
            )
        self._items.check_capacity(item.item_id for item in request.items)
        with _IMAGES.time():
            loaded = await self._images.load([(i.image, i.image_path) for i in request.items])
        new = [_new_item(item, image) for item, image in zip(request.items, loaded, strict=True)]
        rows = [
            ItemRow.of(item.fields, item.text, image.pixels)
            for item, image in zip(new, loaded, strict=True)
        ]
        with _ENCODE.time():
            encoded = await self._encoder.encode_items(
                rows, deadline=deadline, request_id=request_id
            )
        known = self._items.catalogue.index_of
        created = sum(1 for item in new if item.item_id not in known)
        await self._items.upsert(new, encoded.vectors, request_id, encoded.image_features)
        images_encoded = sum(1 for item in new if item.image_encoded)
        problems = [image.problem for image in loaded if image.problem is not None]
        _count_images(images_encoded, problems)
        return recommender_pb2.UpsertItemsResponse(
            upserted=len(new),
            created=created,
            images_encoded=images_encoded,
            images_not_encoded=len(problems),
            image_problems=[
                recommender_pb2.ImageProblem(index=p.index, reason=p.reason) for p in problems
            ],
            model_version=self._metadata.model_version,
            request_id=request_id,
        )

    async def DeleteItems(
        self,
        request: recommender_pb2.DeleteItemsRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.DeleteItemsResponse:
        request_id = current_request_id()
        validate_delete_request(request, self._limits)
        for position, item_id in enumerate(request.item_ids):
            if not self._items.knows(item_id):
                raise NotFound(f"item_ids[{position}] {item_id!r} is not in the catalogue")
        ids = list(dict.fromkeys(request.item_ids))
        await self._items.delete(ids, request_id)
        return recommender_pb2.DeleteItemsResponse(deleted=len(ids), request_id=request_id)

    async def ForgetUser(
        self,
        request: recommender_pb2.ForgetUserRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.ForgetUserResponse:
        request_id = current_request_id()
        validate_forget_request(request)
        forgotten = await self._eraser.forget(request.user_id, request_id)
        return recommender_pb2.ForgetUserResponse(
            history_events_removed=forgotten.history_events,
            feedback_records_erased=forgotten.feedback_records,
            served_lists_erased=forgotten.served_lists,
            request_id=request_id,
        )

    async def Audience(
        self,
        request: recommender_pb2.AudienceRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.AudienceResponse:
        deadline = _deadline(context)
        request_id = current_request_id()
        with _VALIDATE.time():
            validate_audience_request(request, self._limits)
        self._check_model_version(request.model_version)
        audiences = self._require_audiences()
        catalogue = self._items.catalogue  # one snapshot for the whole request
        index = _served_index(catalogue, request.item_id, "item_id")
        scored = await audiences.score(
            [index],
            request.k,
            max_users(request, self._limits),
            context_buckets(request.context, self._metadata, time.time()),
            catalogue,
            deadline=deadline,
            request_id=request_id,
            method="Audience",
        )
        return recommender_pb2.AudienceResponse(
            users=[
                recommender_pb2.AudienceUser(
                    user_id=member.user_id,
                    expected_interactions=member.expected_interactions,
                    probability=member.probability,
                    history_events=member.history_events,
                )
                for member in scored.audiences[0]
            ],
            users_scanned=scored.users_scanned,
            expected_interactions=scored.expected_interactions[0],
            model_version=self._metadata.model_version,
            request_id=request_id,
        )

    async def ForecastDemand(
        self,
        request: recommender_pb2.ForecastDemandRequest,
        context: grpc.aio.ServicerContext,
    ) -> recommender_pb2.ForecastDemandResponse:
        deadline = _deadline(context)
        request_id = current_request_id()
        with _VALIDATE.time():
            validate_forecast_request(request, self._limits)
        self._check_model_version(request.model_version)
        audiences = self._require_audiences()
        catalogue = self._items.catalogue
        indices = [
            _served_index(catalogue, item_id, f"item_ids[{position}]")
            for position, item_id in enumerate(request.item_ids)
        ]
        scored = await audiences.score(
            indices,
            1,  # the top users are not returned: only the sums
            max_users(request, self._limits),
            context_buckets(request.context, self._metadata, time.time()),
            catalogue,
            deadline=deadline,
            request_id=request_id,
            method="ForecastDemand",
        )
        return recommender_pb2.ForecastDemandResponse(
            items=[
                recommender_pb2.ItemDemand(item_id=item_id, expected_interactions=expected)
                for item_id, expected in zip(
                    request.item_ids, scored.expected_interactions, strict=True
                )
            ],
            users_scanned=scored.users_scanned,
            model_version=self._metadata.model_version,
            request_id=request_id,
        )

    def _require_audiences(self) -> Audiences:
        if not self._metadata.audience:
            raise BackendUnavailable(
                "this model repository has no audience model (exported before Audience and "
                "ForecastDemand): re-run the export"
            )
        if self._audiences is None:
            raise BackendUnavailable(
                "this gateway keeps no user history (LTREC_HISTORY_STORE=off): it has no users "
                "to score"
            )
        return self._audiences

    def _check_model_version(self, requested: str) -> None:
        served = self._metadata.model_version
        if requested and requested != served:
            raise NotFound(f"model_version {requested!r} is not served here (serving {served!r})")

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
            FeedbackRecord(
                request_id=event.request_id,
                user_id=event.user_id,
                item_id=event.item_id,
                type=FEEDBACK_TYPE_NAMES[event.type],
                timestamp=event.timestamp or int(now),
                position=event.position if event.HasField("position") else None,
                device=event.context.device,
                region=event.context.region,
                model_version=self._metadata.model_version,
                received_at=round(now, 3),
            )
            for event in events
        ]
        await self._feedback.append([record.to_json() for record in records])
        for record in records:
            metrics.FEEDBACK_EVENTS_TOTAL.labels(type=record.type).inc()
        # Only once they are on disk; a history store that cannot write is counted, not raised.
        if self._history is not None:
            await self._history.remember(feedback_events(events, now), now)
        return len(records)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline in `time.monotonic()` seconds (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _served_index(catalogue: Catalogue, item_id: str, field: str) -> int:
    """The catalogue index of an item the request needs; NotFound when unknown or hidden."""
    index = catalogue.index_of.get(item_id)
    if index is None or catalogue.is_hidden(index):
        raise NotFound(f"{field} {item_id!r} is not in the catalogue")
    return index


def _count_answer(
    method: str,
    item_filter: recommender_pb2.ItemFilter,
    k: int,
    items: list[recommender_pb2.RecommendedItem],
) -> None:
    _count_filter(method, item_filter, k, len(items))
    _count_served(method, items)


def _count_filter(
    method: str, item_filter: recommender_pb2.ItemFilter, k: int, returned: int
) -> None:
    fields = filter_fields(item_filter)
    for name in fields:
        metrics.FILTERED_REQUESTS_TOTAL.labels(method=method, field=name).inc()
    if fields and returned < k:
        metrics.FILTER_SHORT_RESULTS_TOTAL.labels(method=method).inc()


def _count_served(method: str, items: list[recommender_pb2.RecommendedItem]) -> None:
    long_tail = sum(1 for item in items if item.long_tail)
    if long_tail:
        metrics.SERVED_ITEMS_TOTAL.labels(method=method, long_tail="true").inc(long_tail)
    if len(items) > long_tail:
        metrics.SERVED_ITEMS_TOTAL.labels(method=method, long_tail="false").inc(
            len(items) - long_tail
        )


def _count_images(encoded: int, problems: list[ImageProblem]) -> None:
    metrics.ITEM_IMAGES_TOTAL.labels(outcome="encoded").inc(encoded)
    for problem in problems:
        metrics.ITEM_IMAGES_TOTAL.labels(outcome=problem.outcome).inc()


def _new_item(item: recommender_pb2.Item, image: LoadedImage) -> NewItem:
    fields = ItemFields(
        title=item.title,
        description=item.description,
        category=item.category,
        brand=item.brand,
        price_bucket=PRICE_BUCKET_NAMES[item.price_bucket],
    )
    return NewItem(
        item_id=item.item_id,
        fields=fields,
        text=item_text(fields),
        attributes=dict(item.attributes),
        image_path=item.image_path,
        image_bytes=len(item.image),
        image_encoded=image.pixels is not None,
        available=item.available if item.HasField("available") else True,
    )
