"""Every Prometheus metric of the gateway, as module constants on the default registry.

Names follow `ltrec_gateway_<name>_<unit>`; labels come from small fixed sets (`method`, `code`,
`stage`, `model_version`) and never carry user or item ids.

With several worker processes (`server.workers`) prometheus_client runs in multiprocess mode:
counters and histograms are summed over the workers, and each gauge is combined as its
`multiprocess_mode` says (sums of what each worker holds, the max or min of what they all see),
over live workers only.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

NAMESPACE = "ltrec"
SUBSYSTEM = "gateway"

# Whole RPCs: a recommendation SLO sits around 50-100 ms, with a tail up to the caller's deadline.
REQUEST_BUCKETS_SECONDS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Pipeline stages and single Triton calls: from sub-millisecond feature building upwards.
STAGE_BUCKETS_SECONDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

REQUEST_DURATION_SECONDS = Histogram(
    "request_duration_seconds",
    "Time to answer one gateway RPC, by method and status code.",
    ["method", "code"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    buckets=REQUEST_BUCKETS_SECONDS,
)
REQUESTS_TOTAL = Counter(
    "requests_total",
    "Gateway RPCs answered, by method and status code.",
    ["method", "code"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
IN_FLIGHT_REQUESTS = Gauge(
    "in_flight_requests",
    "Gateway RPCs being served now.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livesum",
)
STAGE_DURATION_SECONDS = Histogram(
    "stage_duration_seconds",
    "Time spent in one stage of the Recommend and SimilarItems pipelines (validate, history: "
    "reading the stored history, features, triton, postprocess), of UpsertItems (images: read, "
    "decode and resize; encode) or of Audience and ForecastDemand (users: listing the history "
    "store's users and encoding those not cached; triton: scoring them).",
    ["stage"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    buckets=STAGE_BUCKETS_SECONDS,
)
TRITON_REQUEST_DURATION_SECONDS = Histogram(
    "triton_request_duration_seconds",
    "Time of one inference call to Triton, gRPC's retries of UNAVAILABLE included.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    buckets=STAGE_BUCKETS_SECONDS,
)
TRITON_BATCH_ROWS = Histogram(
    "triton_batch_rows",
    "Requests per ranking call to Triton (Recommend's and SimilarItems' calls of one shape that "
    "arrive while another is in flight go as one call of several rows; server.coalesce), by model.",
    ["model"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
MODEL_VERSION_MISMATCH = Gauge(
    "model_version_mismatch",
    "1 while the model version or content hash that Triton's ensemble serves differs from the "
    "repository this gateway loaded (the gateway is NOT_SERVING meanwhile), else 0; the gateway's "
    "version is ltrec_gateway_model_info's.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livemax",
)
TRITON_ERRORS_TOTAL = Counter(
    "triton_errors_total",
    "Failed inference calls to Triton (after gRPC's retries), by gRPC status code.",
    ["code"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
# From zero at start-up (so rate() sees the first failure): the codes the gateway's Triton client
# turns a failure into itself; others Triton answers appear when first seen.
for _code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
    TRITON_ERRORS_TOTAL.labels(code=_code)
SKIPPED_HISTORY_ITEMS_TOTAL = Counter(
    "skipped_history_items_total",
    "History events ignored because their item id is not in the catalogue.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
CATALOGUE_ITEMS = Gauge(
    "catalogue_items",
    "Items in the loaded catalogue.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livemax",
)
TRITON_READY = Gauge(
    "triton_ready",
    "1 when Triton reported the ensemble ready at the last health poll, else 0.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livemin",
)
FEEDBACK_EVENTS_TOTAL = Counter(
    "feedback_events_total",
    "Feedback events acknowledged (on disk), by type (impression, click, cart, purchase).",
    ["type"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
FEEDBACK_COMMIT_DURATION_SECONDS = Histogram(
    "feedback_commit_duration_seconds",
    "Time to write and fsync one group commit of the feedback store.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    buckets=STAGE_BUCKETS_SECONDS,
)
FEEDBACK_WRITE_ERRORS_TOTAL = Counter(
    "feedback_write_errors_total",
    "Group commits of the feedback store that failed (disk full, I/O error); none acknowledged.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
FEEDBACK_DROPPED_TOTAL = Counter(
    "feedback_served_lists_dropped_total",
    "Served-list records not logged because the feedback store was full, failing or closing.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
FEEDBACK_SEGMENTS_TOTAL = Counter(
    "feedback_segments_total",
    "Feedback store segment files begun by this process (rotation).",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
OVERLAY_ITEMS = Gauge(
    "overlay_items",
    "Items added after training (UpsertItems) that this replica serves now.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livemax",
)
HIDDEN_ITEMS = Gauge(
    "hidden_items",
    "Trained items never returned now: deleted, or replaced by an upserted item.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livemax",
)
ITEMS_PENDING_ENCODING = Gauge(
    "items_pending_encoding",
    "Added items encoded by another model version, waiting to be re-encoded by this one.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livemax",
)
ITEM_UPDATES_TOTAL = Counter(
    "item_updates_total",
    "Item upserts and deletes acknowledged (on disk) by this replica, by op (upsert, delete).",
    ["op"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
ITEM_UPDATE_OPS = ("upsert", "delete")
for _op in ITEM_UPDATE_OPS:
    ITEM_UPDATES_TOTAL.labels(op=_op)
ITEM_STORE_WRITE_ERRORS_TOTAL = Counter(
    "item_store_write_errors_total",
    "Item store writes that failed (disk full, I/O error); none acknowledged.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
ITEM_STORE_UNREADABLE_LINES_TOTAL = Counter(
    "item_store_unreadable_lines_total",
    "Item store lines that are not a complete record (skipped).",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
# Stores that do not grow forever (`ltrec_core.item_log`, `ltrec_core.feedback_log`). The store
# directories are shared by every replica: each reports the same size, so dashboards take max().
ITEM_STORE_BYTES = Gauge(
    "item_store_bytes",
    "Bytes of the item store's files (snapshot and segments) at this replica's last poll.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livemax",
)
# ok: a new snapshot generation; skipped: nothing to fold, or another replica published first;
# error: the disk failed (nothing was deleted).
COMPACTION_RESULTS = ("ok", "skipped", "error")
ITEM_STORE_COMPACTIONS_TOTAL = Counter(
    "item_store_compactions_total",
    "Item store compactions run by this replica, by result (ok, skipped, error).",
    ["result"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
for _result in COMPACTION_RESULTS:
    ITEM_STORE_COMPACTIONS_TOTAL.labels(result=_result)
FEEDBACK_STORE_BYTES = Gauge(
    "feedback_store_bytes",
    "Bytes of the feedback store's segments at this replica's last survey.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livemax",
)
FEEDBACK_STORE_SEGMENTS = Gauge(
    "feedback_store_segments",
    "Segment files in the feedback store at this replica's last survey.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livemax",
)
FEEDBACK_SEGMENTS_RETIRED_TOTAL = Counter(
    "feedback_segments_retired_total",
    "Feedback segments deleted by this replica: consumed by retraining, older than retention.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
FEEDBACK_RETENTION_ERRORS_TOTAL = Counter(
    "feedback_retention_errors_total",
    "Feedback retention passes that failed (disk error, unreadable consumption record).",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
# Outcomes of an UpsertItems item's image: encoded with the item; unreadable (undecodable bytes
# or file, missing file); not_allowed (a URL, a path outside LTREC_IMAGE_ROOT, or no root set).
IMAGE_OUTCOMES = ("encoded", "unreadable", "not_allowed")
ITEM_IMAGES_TOTAL = Counter(
    "item_images_total",
    "Images that came with acknowledged UpsertItems items, by outcome (encoded, unreadable, "
    "not_allowed); the items without a usable image are served by their text and attributes.",
    ["outcome"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
for _outcome in IMAGE_OUTCOMES:  # from zero at start-up, so rate() sees the first one
    ITEM_IMAGES_TOTAL.labels(outcome=_outcome)
# The history store (server.stores.history): ops that failed (Redis unreachable or backing off,
# an I/O error); a failed read serves the Recommend without a stored history, a failed write
# keeps nothing (the Feedback is still acknowledged: the feedback store holds it), a failed
# forget answers ForgetUser UNAVAILABLE, a failed listing or reading of the users (users)
# answers Audience and ForecastDemand UNAVAILABLE.
HISTORY_STORE_OPS = ("read", "write", "forget", "users")
HISTORY_STORE_ERRORS_TOTAL = Counter(
    "history_store_errors_total",
    "History store reads (served without a stored history), writes (events not kept), forgets "
    "(ForgetUser answered UNAVAILABLE) and user listings (users: Audience and ForecastDemand "
    "answered UNAVAILABLE) that failed, by op.",
    ["op"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
HISTORY_EVENTS_WRITTEN_TOTAL = Counter(
    "history_events_written_total",
    "Events handed to the history store (Feedback clicks, carts, purchases; remembered request "
    "histories), duplicates included.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
# Where a Recommend's history came from (RecommendResponse.history_source).
HISTORY_SOURCES = ("request", "stored", "none")
RECOMMEND_HISTORY_SOURCE_TOTAL = Counter(
    "recommend_history_source_total",
    "Recommend answers by the source of their history (request, stored, none).",
    ["source"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
for _op in HISTORY_STORE_OPS:
    HISTORY_STORE_ERRORS_TOTAL.labels(op=_op)
for _source in HISTORY_SOURCES:
    RECOMMEND_HISTORY_SOURCE_TOTAL.labels(source=_source)
# ForgetUser (server.forget): users erased, and what was erased of them by kind: events deleted
# from the history store, feedback records and served lists that retraining now skips.
USERS_FORGOTTEN_TOTAL = Counter(
    "users_forgotten_total",
    "Users erased by ForgetUser (acknowledged: history deleted, erasure record on disk).",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
FORGOTTEN_RECORD_KINDS = ("history_event", "feedback", "served_list")
FORGOTTEN_RECORDS_TOTAL = Counter(
    "forgotten_records_total",
    "What ForgetUser erased, by kind: stored history events deleted (history_event), feedback "
    "records and served lists that retraining skips (feedback, served_list).",
    ["kind"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
for _kind in FORGOTTEN_RECORD_KINDS:
    FORGOTTEN_RECORDS_TOTAL.labels(kind=_kind)
# Business filters (ItemFilter, server.item_filter): the ranking methods that take one, and the
# filter fields a request sets (a request setting several counts once per field).
FILTER_METHODS = ("Recommend", "SimilarItems")
FILTER_FIELDS = ("category", "brand", "price_bucket", "available", "allow", "deny")
FILTERED_REQUESTS_TOTAL = Counter(
    "filtered_requests_total",
    "Recommend and SimilarItems answers whose request had a business filter, by method and by "
    "filter field set (category, brand, price_bucket, available, allow, deny).",
    ["method", "field"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
FILTER_SHORT_RESULTS_TOTAL = Counter(
    "filter_short_results_total",
    "Filtered answers with fewer than k items: fewer items passed the filter (and were not "
    "excluded or in the history) than were asked for.",
    ["method"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
for _method in FILTER_METHODS:
    FILTER_SHORT_RESULTS_TOTAL.labels(method=_method)
    for _field in FILTER_FIELDS:
        FILTERED_REQUESTS_TOTAL.labels(method=_method, field=_field)

# Items of the lists served (Recommend, SimilarItems), by whether each is a long-tail item of the
# catalogue: the long-tail share of what callers are shown, per model version when joined with
# ltrec_gateway_model_info (a canary's effect on the long tail beside the stable version's).
SERVED_ITEM_METHODS = ("Recommend", "SimilarItems")
SERVED_ITEMS_TOTAL = Counter(
    "served_items_total",
    "Items in the answered Recommend (RecommendBatch's included) and SimilarItems lists, by "
    "method and whether the item is a long-tail item (long_tail: true, false).",
    ["method", "long_tail"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
for _method in SERVED_ITEM_METHODS:
    for _flag in ("true", "false"):
        SERVED_ITEMS_TOTAL.labels(method=_method, long_tail=_flag)

# SimilarItems' query size: 1 for item_id, the basket's for basket_item_ids (how large the carts
# sent are, against LTREC_MAX_BASKET_ITEMS).
SIMILAR_ITEMS_QUERY_ITEMS = Histogram(
    "similar_items_query_items",
    "Items in each SimilarItems query: 1 for an item_id, the basket's size for basket_item_ids.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    buckets=(1, 2, 3, 5, 10, 20, 50, 100, 200),
)

# RecommendBatch (server.batch): each request of a stream, by the status code of its inline
# answer (the stream itself is one RPC in requests_total), and those read and not yet answered.
BATCH_REQUESTS_TOTAL = Counter(
    "batch_requests_total",
    "Requests answered inside streaming batch RPCs (RecommendBatch), by method and the status "
    "code of each request's inline answer.",
    ["method", "code"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
BATCH_REQUESTS_IN_FLIGHT = Gauge(
    "batch_requests_in_flight",
    "Requests of batch streams in the Recommend pipeline now (at most LTREC_BATCH_MAX_IN_FLIGHT).",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livesum",
)
# Audience and ForecastDemand (server.audience, server.user_vectors): the users scored per
# answer, where their vectors came from (the cache, or the user encoder for this request), the
# listed users left out (no_id: the store cannot give their id back; no_known_items: their
# history holds no catalogue item), and the users whose vectors are cached.
AUDIENCE_METHODS = ("Audience", "ForecastDemand")
AUDIENCE_SCANNED_USERS = Histogram(
    "audience_scanned_users",
    "Users scored by one Audience or ForecastDemand answer (at most its max users).",
    ["method"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    buckets=(0, 10, 100, 1_000, 10_000, 100_000, 1_000_000),
)
AUDIENCE_USER_VECTOR_SOURCES = ("cache", "encoded")
AUDIENCE_USER_VECTORS_TOTAL = Counter(
    "audience_user_vectors_total",
    "User vectors of the users Audience and ForecastDemand scored, by source (cache; encoded: "
    "by Triton's user encoder for that request, new or changed since).",
    ["source"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
AUDIENCE_SKIP_REASONS = ("no_id", "no_known_items")
AUDIENCE_SKIPPED_USERS_TOTAL = Counter(
    "audience_skipped_users_total",
    "Users of the history store that Audience and ForecastDemand listed and did not score, by "
    "reason (no_id: kept before ids were, or under another hash key; no_known_items: no item of "
    "their history is in the catalogue).",
    ["reason"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
AUDIENCE_CACHED_USERS = Gauge(
    "audience_cached_users",
    "Users whose vectors this replica keeps for Audience and ForecastDemand.",
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livesum",
)
for _method in AUDIENCE_METHODS:
    AUDIENCE_SCANNED_USERS.labels(method=_method)
for _source in AUDIENCE_USER_VECTOR_SOURCES:
    AUDIENCE_USER_VECTORS_TOTAL.labels(source=_source)
for _reason in AUDIENCE_SKIP_REASONS:
    AUDIENCE_SKIPPED_USERS_TOTAL.labels(reason=_reason)

# Access control (`server.access`): refused admin RPCs by reason (missing_credentials and
# invalid_token answer UNAUTHENTICATED, not_allowed PERMISSION_DENIED), and RPCs refused by the
# per-caller concurrency limit. No caller identity is ever a label.
AUTH_DENIED_REASONS = ("missing_credentials", "invalid_token", "not_allowed")
AUTH_DENIED_TOTAL = Counter(
    "auth_denied_total",
    "Admin RPCs (UpsertItems, DeleteItems, ForgetUser) refused to a caller that is not allowed, "
    "by method and reason.",
    ["method", "reason"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)
CALLER_LIMIT_REJECTED_TOTAL = Counter(
    "caller_limit_rejected_total",
    "RPCs answered RESOURCE_EXHAUSTED because their caller already had "
    "LTREC_MAX_CONCURRENT_PER_CALLER RPCs in flight, by method.",
    ["method"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
)

# A gauge at 1 (what an Info metric exposes), since Info does not work in prometheus_client's
# multiprocess mode (LTREC_WORKERS > 1).
MODEL_INFO = Gauge(
    "model_info",
    "The exported model the gateway serves: 1, labelled with its version.",
    ["model_version"],
    namespace=NAMESPACE,
    subsystem=SUBSYSTEM,
    multiprocess_mode="livemax",
)


# The status codes the gateway documents; their counters exist from start-up at zero, so that an
# error ratio reads 0 (not "no data") while all is well and the first error is seen by rate().
DOCUMENTED_CODES = (
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "CANCELLED",
)


def initialise_request_counters(methods: Iterable[str], batch_methods: Iterable[str] = ()) -> None:
    for method in methods:
        for code in DOCUMENTED_CODES:
            REQUESTS_TOTAL.labels(method=method, code=code)
    for method in batch_methods:
        for code in DOCUMENTED_CODES:
            if code != "CANCELLED":  # a request of a stream is answered or the stream ends
                BATCH_REQUESTS_TOTAL.labels(method=method, code=code)


_model_version = ""


def set_model_version(version: str) -> None:
    """Records the served model version (the `MODEL_INFO` metric and every access-log line)."""
    global _model_version
    _model_version = version
    MODEL_INFO.labels(model_version=version).set(1)


def model_version() -> str:
    return _model_version


def initialise_access_counters(methods: Iterable[str], admin_methods: Iterable[str]) -> None:
    """The access counters at zero from start-up, as the request counters."""
    for method in methods:
        CALLER_LIMIT_REJECTED_TOTAL.labels(method=method)
    for method in admin_methods:
        for reason in AUTH_DENIED_REASONS:
            AUTH_DENIED_TOTAL.labels(method=method, reason=reason)
