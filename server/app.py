"""Wiring: build the gRPC server (services, interceptor, health, reflection) and run it."""

from __future__ import annotations

import asyncio
import importlib
import logging
import secrets
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from ltrec_core import contract
from server import metrics
from server.access import ADMIN_METHODS, AccessInterceptor, Authoriser, CallerLimiter
from server.audience import Audiences
from server.batch import METHOD as BATCH_METHOD
from server.batch import BatchLimits, BatchRunner
from server.catalogue import describe, load_model_repository
from server.coalesce import Coalescer
from server.config import GatewayConfig
from server.errors import StartupError
from server.forget import UserEraser
from server.gen.ltrec.v1 import recommender_pb2, recommender_pb2_grpc
from server.health import HealthReporter
from server.interceptors import GatewayInterceptor, add_wrapped
from server.item_encoder import TritonItemEncoder
from server.item_images import ItemImages
from server.item_tokenizer import ItemTokenizer
from server.logs import configure_logging
from server.servicer import SERVICE_NAME, RecommenderServicer
from server.stores.feedback import FeedbackStore
from server.stores.history import HistoryBackend, HistoryStore
from server.stores.history_redis import RedisHistory
from server.stores.history_sqlite import SqliteHistory
from server.stores.items import ItemStore
from server.tracing import configure_tracing
from server.triton_client import (
    GrpcTritonTransport,
    ModelIdentity,
    TritonClient,
    TritonTransport,
)
from server.triton_stream import StreamingTritonTransport
from server.user_vectors import UserVectors
from server.validation import RequestLimits

logger = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class GatewayServer(grpc.aio.Server):
    """A `grpc.aio.Server` that owns the gateway's other resources.

    `start` also starts the feedback writer, the item store poll and the health poll;
    `stop(grace)` is the shutdown sequence: NOT_SERVING, keep serving for the drain time,
    `await server.stop(grace)`, close the feedback, item and history stores, close the Triton
    client.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        health: HealthReporter,
        triton: TritonClient,
        feedback: FeedbackStore,
        items: ItemStore,
        drain_seconds: float = 0.0,
        history: HistoryStore | None = None,
    ) -> None:
        self._server = server
        self._history = history
        self._health = health
        self._triton = triton
        self._feedback = feedback
        self._items = items
        self._drain_seconds = drain_seconds
        self._stopped = False

    @property
    def health(self) -> HealthReporter:
        return self._health

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: Any, method_handlers: Any) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        port: int = self._server.add_insecure_port(address)
        return port

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        port: int = self._server.add_secure_port(address, server_credentials)
        return port

    @property
    def feedback(self) -> FeedbackStore:
        return self._feedback

    @property
    def items(self) -> ItemStore:
        return self._items

    @property
    def history(self) -> HistoryStore | None:
        return self._history

    async def start(self) -> None:
        await self._feedback.start()
        await self._items.start()
        await self._server.start()
        await self._health.start()

    async def stop(self, grace: float | None) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._health.shutdown()
        if self._drain_seconds > 0:
            logger.info("NOT_SERVING; still serving for %.1f s (drain)", self._drain_seconds)
            await asyncio.sleep(self._drain_seconds)
        await self._server.stop(grace)
        # After the drain: every Feedback call that was answered OK is already on disk; this
        # writes the served lists still queued.
        await self._feedback.close()
        await self._items.close()
        if self._history is not None:
            await self._history.close()
        await self._triton.close()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        terminated: bool = await self._server.wait_for_termination(timeout)
        return terminated


def create_server(
    config: GatewayConfig, *, transport: TritonTransport | None = None
) -> tuple[GatewayServer, int]:
    """Loads the model repository files and binds the port (0 picks a free one); not started.

    `transport` replaces the tritonclient connection (tests pass a fake).
    """
    metadata, catalogue = load_model_repository(config.model_repository)
    logger.info(
        "loaded model repository %s: %s", config.model_repository, describe(metadata, catalogue)
    )
    metrics.CATALOGUE_ITEMS.set(catalogue.size)
    methods = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].methods_by_name
    metrics.initialise_request_counters(methods, batch_methods=(BATCH_METHOD,))
    metrics.initialise_access_counters(methods, ADMIN_METHODS)
    metrics.set_model_version(metadata.model_version)

    images = ItemImages(config.image_root)  # before any store is opened: fails fast
    authoriser = Authoriser.from_config(config)
    admin = ", ".join(sorted(ADMIN_METHODS))
    if authoriser.allows_nobody:
        logger.warning("admin RPCs (%s) allowed to %s", admin, authoriser.describe())
    else:
        logger.info("admin RPCs (%s) allowed to %s", admin, authoriser.describe())
    if transport is None:
        transport = GrpcTritonTransport(
            config.triton_url,
            retries=config.triton_retries,
            backoff_seconds=config.triton_retry_backoff_seconds,
        )
        if config.triton_transport == "stream":
            transport = StreamingTritonTransport.connect(
                config.triton_url,
                transport,
                retries=config.triton_retries,
                backoff_seconds=config.triton_retry_backoff_seconds,
                streams=config.triton_streams,
                max_age_seconds=config.triton_stream_max_age_seconds,
            )
    triton = TritonClient(transport, timeout_seconds=config.triton_timeout_seconds)
    ranking: TritonClient | Coalescer = (
        Coalescer(
            triton,
            max_rows=metadata.max_batch_rows,
            max_in_flight=config.triton_coalesce_max_in_flight,
        )
        if config.triton_coalesce
        else triton
    )
    limits = RequestLimits(
        max_k=config.max_k,
        max_history=config.max_request_history,
        max_exclude=config.max_exclude,
        max_filter_item_ids=config.max_filter_item_ids,
        max_basket_items=config.max_basket_items,
        basket_lookup=metadata.basket_lookup,
        long_tail_weight_max=metadata.long_tail_weight_max,
        max_feedback_batch=config.feedback_max_batch,
        max_item_batch=config.items_max_batch,
        history_store=config.history_store != "off",
        history_retention_seconds=config.history_retention_seconds,
        max_audience_k=config.audience_max_k,
        max_audience_users=config.audience_max_users,
        max_forecast_items=config.forecast_max_items,
    )
    feedback = FeedbackStore(
        config.feedback_dir,
        replica=config.feedback_replica,
        max_segment_bytes=config.feedback_max_segment_bytes,
        max_pending_records=config.feedback_max_pending,
        retention_seconds=config.feedback_retention_seconds,
    )
    feedback.open()
    logger.info("feedback store %s (replica %s)", config.feedback_dir, feedback.replica)
    items = ItemStore(
        config.items_dir,
        catalogue,
        metadata,
        replica=config.feedback_replica,
        poll_interval_seconds=config.items_poll_interval_seconds,
        max_segment_bytes=config.items_max_segment_bytes,
        max_overlay_items=config.items_max_overlay,
        compact_tail_bytes=config.items_compact_tail_bytes,
        compact_tail_records=config.items_compact_tail_records,
    )
    items.open()
    tokenizer = ItemTokenizer.from_repository(config.model_repository, metadata.text_max_tokens)
    encoder = (
        None
        if tokenizer is None
        else TritonItemEncoder(
            tokenizer, triton, metadata.embedding_dim, config.items_encode_timeout_seconds
        )
    )
    items.set_encoder(None if encoder is None else encoder.encode)
    history, user_hash_key = open_history_store(config, metadata.max_history)
    # Without a configured (or kept) key, user hashes are consistent within this process only;
    # the access log and ForgetUser's audit line share it, so that their users join.
    user_hash_key = user_hash_key or secrets.token_hex(32)
    # The access interceptor runs inside the gateway interceptor: its refusals are statuses of
    # the one error table, counted and logged like any other.
    access = AccessInterceptor(
        (SERVICE_NAME,), authoriser, CallerLimiter(config.max_concurrent_per_caller)
    )
    # Applied to the service's handlers once, at registration (`add_wrapped`), rather than as
    # `grpc.aio.server` interceptors, which add a coroutine pipeline to every RPC.
    interceptors = (GatewayInterceptor((SERVICE_NAME,), user_hash_key), access)
    server = grpc.aio.server(
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=server_options(config),
    )
    user_vectors = (
        None
        if history is None
        else UserVectors(
            history,
            triton,
            max_history=metadata.max_history,
            embedding_dim=metadata.embedding_dim,
            max_cached=config.audience_max_users,
        )
    )
    eraser = UserEraser(feedback, history, user_hash_key.encode(), user_vectors)
    batch = BatchRunner(
        BatchLimits(
            window=config.batch_stream_window,
            max_in_flight=config.batch_max_in_flight,
            max_requests=config.batch_max_requests_per_stream,
        ),
        user_hash_key.encode(),
    )
    add_wrapped(
        recommender_pb2_grpc.add_RecommenderServicer_to_server,
        RecommenderServicer(
            metadata,
            items,
            ranking,
            limits,
            feedback,
            encoder,
            images,
            history,
            eraser=eraser,
            batch=batch,
            audiences=None if user_vectors is None else Audiences(user_vectors, triton),
        ),
        server,
        interceptors,
    )
    expected = (
        ModelIdentity(metadata.model_version, metadata.content_hash)
        if metadata.content_hash
        else None
    )
    if expected is None:
        logger.warning(
            "%s has no content_hash (exported before it was written): the model Triton serves "
            "is not compared with this one; re-run the export",
            contract.METADATA_FILE,
        )
    health = HealthReporter(triton, (SERVICE_NAME,), config.health_poll_interval_seconds, expected)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{config.grpc_host}:{config.grpc_port}"
    if config.tls:
        port = server.add_secure_port(address, server_credentials(config))
    else:
        port = server.add_insecure_port(address)
    return (
        GatewayServer(
            server, health, triton, feedback, items, config.shutdown_drain_seconds, history
        ),
        port,
    )


def open_history_store(config: GatewayConfig, max_events: int) -> tuple[HistoryStore | None, str]:
    """The configured history store (None: off) and the user hash key of logs and store: the
    configured one, else, with SQLite, the one kept in its file (users keep their history over
    restarts), else random per process."""
    if config.history_store == "off":
        return None, config.user_hash_key
    backend: HistoryBackend
    if config.history_store == "redis":
        backend = RedisHistory(
            config.history_redis_address,
            password=config.history_redis_password,
            timeout_seconds=config.history_timeout_seconds,
            unavailable_backoff_seconds=config.history_unavailable_backoff_seconds,
        )
        key = config.user_hash_key  # required by the configuration
        where = config.history_redis_address
    else:
        sqlite = SqliteHistory(config.history_sqlite_path)
        sqlite.open()
        backend, key = sqlite, config.user_hash_key or sqlite.hash_key()
        where = str(config.history_sqlite_path)
    store = HistoryStore(
        backend,
        key.encode(),
        max_events=max_events,
        retention_seconds=config.history_retention_seconds,
        name=config.history_store,
    )
    logger.info(
        "history store: %s at %s (%d events per user, retention %d s)",
        config.history_store,
        where,
        max_events,
        config.history_retention_seconds,
    )
    return store, key


def server_options(config: GatewayConfig) -> list[tuple[str, int]]:
    options = [("grpc.max_receive_message_length", config.max_message_bytes)]
    if config.workers > 1:
        # The workers (`server.workers`) bind the same port; the kernel spreads connections.
        options.append(("grpc.so_reuseport", 1))
    if config.max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
            # In-flight calls on an aged connection get the shutdown grace to finish.
            ("grpc.max_connection_age_grace_ms", int(config.shutdown_grace_seconds * 1000)),
        ]
    return options


def server_credentials(config: GatewayConfig) -> grpc.ServerCredentials:
    """TLS from PEM files; with a client CA, mutual TLS (client certificates required)."""

    def read(path: str, variable: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise StartupError(f"{variable}: cannot read {path}: {exc.strerror}") from exc

    key = read(config.tls_key_file, "LTREC_TLS_KEY_FILE")
    chain = read(config.tls_cert_file, "LTREC_TLS_CERT_FILE")
    client_ca = (
        read(config.tls_client_ca_file, "LTREC_TLS_CLIENT_CA_FILE")
        if config.tls_client_ca_file
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def run(config: GatewayConfig) -> int:
    """Serves until SIGTERM or SIGINT (one process, or one worker of several); the exit code:
    0, or 2 when the configuration or the model repository files are unusable."""
    provider = None
    try:
        provider = configure_tracing()
        with asyncio.Runner(loop_factory=event_loop_factory(config.event_loop)) as runner:
            runner.run(serve(config))
    except StartupError as exc:
        logger.error("cannot start the gateway: %s", exc)
        return 2
    finally:
        if provider is not None:
            provider.shutdown()  # exports the spans still queued
    return 0


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (libuv: fewer Python frames per gRPC callback) when `name` is
    "uvloop" and it can be imported; otherwise asyncio's own (None), with a warning if uvloop
    was asked for."""
    if name != "uvloop":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        logger.warning("LTREC_EVENT_LOOP=uvloop but uvloop cannot be imported: asyncio's loop")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_worker(config: GatewayConfig) -> int:
    """`run` in a worker process of `server.workers`: its own log writer, lines with its pid."""
    log = configure_logging(
        config.log_level, pid=True, flush_interval=config.log_flush_interval_seconds
    )
    try:
        return run(config)
    finally:
        log.stop()


async def serve(config: GatewayConfig) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down within `shutdown_grace_seconds`."""
    server, port = create_server(config)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.grpc_host)
        logger.info("metrics on :%d/metrics", config.metrics_port)
    await server.start()
    logger.info(
        "gateway listening on %s:%d, Triton at %s (%s calls, event loop %s)",
        config.grpc_host,
        port,
        config.triton_url,
        config.triton_transport,
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("shutting down (grace %.1f s)", config.shutdown_grace_seconds)
    finally:
        await server.stop(config.shutdown_grace_seconds)
    logger.info("gateway stopped")
