"""Gateway configuration: one frozen dataclass read from `LTREC_*` environment variables."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import StartupError
from server.logs import DEFAULT_FLUSH_INTERVAL_SECONDS, MAX_FLUSH_INTERVAL_SECONDS
from server.stores.history import (
    DEFAULT_RETENTION_SECONDS,
    MAX_RETENTION_SECONDS,
    MIN_RETENTION_SECONDS,
)
from server.stores.history_redis import check_address

HISTORY_STORES = ("sqlite", "redis", "off")
EVENT_LOOPS = ("uvloop", "asyncio")
TRITON_TRANSPORTS = ("unary", "stream")
# ModelStreamInfer streams per model at most (LTREC_TRITON_STREAMS).
MAX_TRITON_STREAMS = 16
# Upper bounds of the RecommendBatch limits (memory: window x max message bytes per stream).
MAX_BATCH_STREAM_WINDOW = 1024
MAX_BATCH_IN_FLIGHT = 4096
MAX_BATCH_REQUESTS_PER_STREAM = 1_000_000
# Upper bounds of the Audience and ForecastDemand limits.
MAX_AUDIENCE_K = 100_000
MAX_AUDIENCE_USERS = 1_000_000
MAX_FORECAST_ITEMS = 10_000
# Coalesced Triton calls of one shape in flight at once (LTREC_TRITON_COALESCE_MAX_IN_FLIGHT).
MAX_COALESCE_IN_FLIGHT = 64
# Gateway worker processes (LTREC_WORKERS) at most.
MAX_WORKERS = 64

ENV_PREFIX = "LTREC_"
# Who may call the admin RPCs (`server.access`): callers with a token or an allowed client
# certificate, or (local stacks) every caller.
REQUIRE = "require"
ALLOW_ALL = "allow-all"
ADMIN_AUTH_MODES = (REQUIRE, ALLOW_ALL)
# Allow-list entries are separated by these (an RFC 2253 subject has commas and escapes `;`).
IDENTITY_SEPARATORS = re.compile(r"[;\n]")
# Optional paths: an empty variable leaves them unset.
OPTIONAL_PATHS = ("image_root", "admin_tokens_dir")


class ConfigError(StartupError):
    """An environment variable holds a value the gateway cannot use."""


@dataclass(frozen=True)
class GatewayConfig:
    """Every field `name` is read from `LTREC_<NAME>`; units are part of the names."""

    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    # 0 disables the Prometheus HTTP endpoint (tests); the gRPC port 0 picks a free port.
    metrics_port: int = 9100
    # Gateway processes sharing the gRPC port (SO_REUSEPORT; `server.workers`): a Python process
    # serves about one core. The limits below (max_concurrent_rpcs, the per-caller and batch
    # limits, caches) are each worker's.
    workers: int = 1
    # Any gRPC target: `host:port`, `dns:///name:port` (the chart's headless Service: every ready
    # Triton pod, spread by round_robin), `ipv4:host:port,host:port`.
    triton_url: str = "127.0.0.1:8001"
    model_repository: Path = Path("model_repository")
    triton_timeout_seconds: float = 2.0
    # gRPC's retry policy for inference (UNAVAILABLE only), within triton_timeout_seconds.
    triton_retries: int = 2
    triton_retry_backoff_seconds: float = 0.05
    # Recommend's and SimilarItems' Triton calls of one shape that arrive while
    # triton_coalesce_max_in_flight calls of that shape are in flight wait and go together, as one
    # call of up to 64 rows (`server.coalesce`); never a wait at low load. false: one call each.
    triton_coalesce: bool = True
    triton_coalesce_max_in_flight: int = 1
    # How inference reaches Triton (`server.triton_stream`): stream, messages on long-lived
    # ModelStreamInfer streams (triton_streams per model, each replaced after
    # triton_stream_max_age_seconds, below Triton's --grpc-max-connection-age grace); unary, one
    # ModelInfer call each (with gRPC's retries). Traced calls are always unary.
    triton_transport: str = "unary"
    triton_streams: int = 1
    triton_stream_max_age_seconds: float = 20.0
    # The event loop: asyncio's, or uvloop (when it can be imported; else asyncio's, with a
    # warning). uvloop measured no faster here (benchmarks/gateway_ab.py), so it is not pinned.
    event_loop: str = "asyncio"
    max_k: int = 500
    max_request_history: int = 1000
    max_exclude: int = 1000
    # Ids per ItemFilter.allow_item_ids and per ItemFilter.deny_item_ids.
    max_filter_item_ids: int = 1000
    # Items per SimilarItems basket (basket_item_ids).
    max_basket_items: int = 50
    # Beyond this many concurrent RPCs gRPC itself answers RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 1000
    # Larger request messages are refused by gRPC with RESOURCE_EXHAUSTED before any work.
    max_message_bytes: int = 4 * 1024 * 1024
    health_poll_interval_seconds: float = 1.0
    # SIGTERM: NOT_SERVING at once, then keep serving for the drain time (load balancers and
    # health-checking clients move away; connections older than the max age get a graceful
    # GOAWAY and reconnect elsewhere), then stop accepting and finish in-flight calls within the
    # grace time. Stopping while clients still send on open connections loses the calls that
    # cross the final GOAWAY (grpc/grpc#41785), hence drain >= max connection age in a rollout.
    shutdown_grace_seconds: float = 10.0
    shutdown_drain_seconds: float = 0.0
    # Connections are closed gracefully after this age (0: never), so callers rebalance over
    # replicas and a draining replica loses its connections without losing calls.
    max_connection_age_seconds: float = 30.0
    log_level: str = "INFO"
    # The log's writer thread writes what is queued this often (0: each line as it comes);
    # warnings and errors go at once (`server.logs`).
    log_flush_interval_seconds: float = DEFAULT_FLUSH_INTERVAL_SECONDS
    # TLS: a PEM certificate chain and key serve gRPC over TLS; with a client CA as well, callers
    # must present a certificate it signed (mutual TLS). Without them the gateway refuses to
    # start unless plaintext is explicitly allowed (local development, a mesh that adds mTLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    allow_plaintext: bool = False
    # Key of the HMAC that stands for user ids in log lines; empty: a random key per process.
    user_hash_key: str = field(default="", repr=False)
    # The feedback store (`server.stores.feedback`): served lists and Feedback records, fsync'd JSON
    # lines in segments of at most this many bytes, one series of segments per replica (default
    # name: the host name).
    feedback_dir: Path = Path("feedback")
    feedback_replica: str = ""
    feedback_max_segment_bytes: int = 64 * 1024 * 1024
    feedback_max_batch: int = 1000
    # Records waiting for the disk beyond which Feedback answers RESOURCE_EXHAUSTED.
    feedback_max_pending: int = 10_000
    # Retention (`ltrec_core.feedback_log.retire`): closed segments that a retraining consumed
    # (`ltrec.retrain merge` records what it read) and last written longer ago than this are
    # deleted, ForgetUser's tombstones carried over; 0: keep every segment.
    feedback_retention_seconds: int = 0
    # The item store (`server.stores.items`): items added (UpsertItems) or hidden (DeleteItems)
    # after training, fsync'd JSON lines that every replica writes (segments named by
    # feedback_replica) and reads: a directory all replicas mount, polled every interval.
    items_dir: Path = Path("items")
    items_poll_interval_seconds: float = 1.0
    items_max_segment_bytes: int = 64 * 1024 * 1024
    # Compaction (`ltrec_core.item_log`): once the records this replica could fold into a new
    # snapshot pass either many bytes or records, its poll compacts; 0: that bound never does.
    items_compact_tail_bytes: int = 16 * 1024 * 1024
    items_compact_tail_records: int = 20_000
    # Items per UpsertItems call and ids per DeleteItems call.
    items_max_batch: int = 64
    # Added items served at once (each goes to Triton with every request: M x D floats).
    items_max_overlay: int = 10_000
    # Per item encoder call (the image encoder on the batch's images, then MiniLM and the fusion
    # on up to items_max_batch items); the caller's deadline wins if smaller.
    items_encode_timeout_seconds: float = 10.0
    # The directory UpsertItems' Item.image_path is read from (paths resolved against it, none
    # may leave it); unset: image_path is refused (each item reports an ImageProblem).
    image_root: Path | None = None
    # The history store (`server.stores.history`): each user's recent Feedback clicks, carts and
    # purchases (and remembered request histories), which a Recommend with a user_id and no
    # history uses. sqlite: one file on this machine (WAL; survives restarts). redis: shared by
    # every replica (host:port or a redis:// / rediss:// URL; the password in its own variable,
    # e.g. from a Secret; needs LTREC_USER_HASH_KEY so that replicas hash user ids alike).
    # off: none (a Recommend without history is answered without one, as before).
    history_store: str = "sqlite"
    history_sqlite_path: Path = Path("history/history.sqlite3")
    history_redis_address: str = ""
    history_redis_password: str = field(default="", repr=False)
    # Events older than this are never used and are pruned.
    history_retention_seconds: int = DEFAULT_RETENTION_SECONDS
    # Per Redis call (no retry); after a failure Redis is not asked for the backoff time.
    history_timeout_seconds: float = 0.1
    history_unavailable_backoff_seconds: float = 1.0
    # RecommendBatch (`server.batch`): requests of one stream read and not yet answered (the
    # stream is not read while they are; a stream holds at most this many requests of at most
    # LTREC_MAX_MESSAGE_BYTES each), requests of all streams in the pipeline at once (batch work
    # cannot take all of Triton from online calls), and requests taken from one stream.
    batch_stream_window: int = 16
    batch_max_in_flight: int = 64
    batch_max_requests_per_stream: int = 10_000
    # Audience and ForecastDemand (`server.audience`): users an Audience returns at most; users
    # a request scans at most (the history store's most recently active; also how many users'
    # vectors are cached: memory of embedding_dim floats each); items per ForecastDemand. A
    # request costs users x catalogue scores in Triton.
    audience_max_k: int = 1000
    audience_max_users: int = 10_000
    forecast_max_items: int = 100
    # Access control (`server.access`) of the admin RPCs (UpsertItems, DeleteItems, ForgetUser).
    # require: only callers with a bearer token of the tokens directory (one file per token,
    # named by its caller: a mounted Secret) or with a client certificate (mutual TLS) whose
    # subject (RFC 2253, e.g. `CN=sync,O=Shop`) or a SAN is one of the `;`-separated allowed
    # identities; with neither configured, no caller. allow-all: every caller (local stacks).
    admin_auth: str = REQUIRE
    admin_tokens_dir: Path | None = None
    admin_allowed_identities: str = ""
    # RPCs in flight per caller (a token's name, a certificate's subject, or one "anonymous"
    # bucket for every caller without either), each RPC of a stream for its whole length;
    # 0: no limit but max_concurrent_rpcs.
    max_concurrent_per_caller: int = 0

    def __post_init__(self) -> None:
        _check(
            self.tls_key_file,
            "tls_key_file",
            bool(self.tls_cert_file) == bool(self.tls_key_file),
            "set together with LTREC_TLS_CERT_FILE",
        )
        _check(
            self.tls_client_ca_file,
            "tls_client_ca_file",
            not self.tls_client_ca_file or bool(self.tls_cert_file),
            "used only with LTREC_TLS_CERT_FILE and LTREC_TLS_KEY_FILE",
        )
        _check(self.grpc_port, "grpc_port", 0 <= self.grpc_port <= 65535, "in [0, 65535]")
        _check(self.workers, "workers", 1 <= self.workers <= MAX_WORKERS, f"in [1, {MAX_WORKERS}]")
        _check(
            self.grpc_port,
            "grpc_port",
            self.workers == 1 or self.grpc_port > 0,
            "a fixed port (not 0) with LTREC_WORKERS > 1: the workers share it",
        )
        _check(self.metrics_port, "metrics_port", 0 <= self.metrics_port <= 65535, "in [0, 65535]")
        _check(self.grpc_host, "grpc_host", bool(self.grpc_host.strip()), "non-empty")
        _check(self.triton_url, "triton_url", bool(self.triton_url.strip()), "non-empty")
        for name in (
            "triton_timeout_seconds",
            "health_poll_interval_seconds",
            "items_poll_interval_seconds",
            "items_encode_timeout_seconds",
            "history_timeout_seconds",
            "triton_stream_max_age_seconds",
        ):
            value = getattr(self, name)
            _check(value, name, math.isfinite(value) and value > 0, "a finite number > 0")
        for name in (
            "shutdown_grace_seconds",
            "shutdown_drain_seconds",
            "max_connection_age_seconds",
            "history_unavailable_backoff_seconds",
        ):
            value = getattr(self, name)
            _check(value, name, math.isfinite(value) and value >= 0, "a finite number >= 0")
        # gRPC's retry policy (server/triton_client.py) allows at most 5 attempts.
        _check(self.triton_retries, "triton_retries", 0 <= self.triton_retries <= 4, "in [0, 4]")
        backoff = self.triton_retry_backoff_seconds
        _check(backoff, "triton_retry_backoff_seconds", 0.001 <= backoff <= 60, "in [0.001, 60]")
        _check(
            self.triton_coalesce_max_in_flight,
            "triton_coalesce_max_in_flight",
            1 <= self.triton_coalesce_max_in_flight <= MAX_COALESCE_IN_FLIGHT,
            f"in [1, {MAX_COALESCE_IN_FLIGHT}]",
        )
        transport = self.triton_transport
        _check(
            transport,
            "triton_transport",
            transport in TRITON_TRANSPORTS,
            f"one of {TRITON_TRANSPORTS}",
        )
        _check(
            self.triton_streams,
            "triton_streams",
            1 <= self.triton_streams <= MAX_TRITON_STREAMS,
            f"in [1, {MAX_TRITON_STREAMS}]",
        )
        loop = self.event_loop
        _check(loop, "event_loop", loop in EVENT_LOOPS, f"one of {EVENT_LOOPS}")
        flush = self.log_flush_interval_seconds
        _check(
            flush,
            "log_flush_interval_seconds",
            0 <= flush <= MAX_FLUSH_INTERVAL_SECONDS,
            f"in [0, {MAX_FLUSH_INTERVAL_SECONDS:g}]",
        )
        levels = ("DEBUG", "INFO", "WARNING", "ERROR")
        _check(self.log_level, "log_level", self.log_level in levels, f"one of {levels}")
        for name in (
            "max_k",
            "max_request_history",
            "max_exclude",
            "max_filter_item_ids",
            "max_basket_items",
            "max_concurrent_rpcs",
            "max_message_bytes",
            "feedback_max_batch",
            "feedback_max_pending",
            "items_max_batch",
            "items_max_overlay",
        ):
            value = getattr(self, name)
            _check(value, name, value >= 1, ">= 1")
        _check(
            self.items_max_segment_bytes,
            "items_max_segment_bytes",
            self.items_max_segment_bytes >= 4096,
            ">= 4096",
        )
        _check(
            self.feedback_max_segment_bytes,
            "feedback_max_segment_bytes",
            self.feedback_max_segment_bytes >= 4096,
            ">= 4096",
        )
        for name in (
            "feedback_retention_seconds",
            "items_compact_tail_bytes",
            "items_compact_tail_records",
        ):
            value = getattr(self, name)
            _check(value, name, value >= 0, ">= 0 (0: off)")
        self._check_history()
        self._check_access()
        for name, most in (
            ("batch_stream_window", MAX_BATCH_STREAM_WINDOW),
            ("batch_max_in_flight", MAX_BATCH_IN_FLIGHT),
            ("batch_max_requests_per_stream", MAX_BATCH_REQUESTS_PER_STREAM),
            ("audience_max_k", MAX_AUDIENCE_K),
            ("audience_max_users", MAX_AUDIENCE_USERS),
            ("forecast_max_items", MAX_FORECAST_ITEMS),
        ):
            value = getattr(self, name)
            _check(value, name, 1 <= value <= most, f"in [1, {most}]")
        _check(
            self.allow_plaintext,
            "allow_plaintext",
            self.tls or self.allow_plaintext,
            "true to serve without TLS (or set LTREC_TLS_CERT_FILE and LTREC_TLS_KEY_FILE)",
        )

    def _check_history(self) -> None:
        store = self.history_store
        _check(store, "history_store", store in HISTORY_STORES, f"one of {HISTORY_STORES}")
        _check(
            self.history_retention_seconds,
            "history_retention_seconds",
            MIN_RETENTION_SECONDS <= self.history_retention_seconds <= MAX_RETENTION_SECONDS,
            f"in [{MIN_RETENTION_SECONDS}, {MAX_RETENTION_SECONDS}] (a minute to a year)",
        )
        address = self.history_redis_address
        if store == "redis":
            _check(address, "history_redis_address", bool(address), "set with history_store redis")
            problem = check_address(address)
            # Not echoed: it may hold a password.
            _check("...", "history_redis_address", problem is None, str(problem))
            _check(
                "",
                "user_hash_key",
                bool(self.user_hash_key),
                "set with LTREC_HISTORY_STORE=redis (replicas must hash user ids alike)",
            )
        else:
            _check(
                address,
                "history_redis_address",
                not address,
                "empty unless LTREC_HISTORY_STORE=redis",
            )

    def _check_access(self) -> None:
        mode = self.admin_auth
        _check(mode, "admin_auth", mode in ADMIN_AUTH_MODES, f"one of {ADMIN_AUTH_MODES}")
        _check(
            self.admin_allowed_identities,
            "admin_allowed_identities",
            not self.allowed_identities or bool(self.tls_client_ca_file),
            "empty unless LTREC_TLS_CLIENT_CA_FILE is set (only mutual TLS proves an identity)",
        )
        _check(
            self.max_concurrent_per_caller,
            "max_concurrent_per_caller",
            0 <= self.max_concurrent_per_caller <= self.max_concurrent_rpcs,
            f"in [0, LTREC_MAX_CONCURRENT_RPCS={self.max_concurrent_rpcs}] (0: no limit)",
        )

    @property
    def allowed_identities(self) -> frozenset[str]:
        """The client certificate subjects and SANs that may call the admin RPCs."""
        entries = IDENTITY_SEPARATORS.split(self.admin_allowed_identities)
        return frozenset(entry.strip() for entry in entries if entry.strip())

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewayConfig:
        """Reads the configuration; unset variables keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for spec in dataclasses.fields(cls):
            var = env_var(spec.name)
            raw = env.get(var)
            if raw is None:
                continue
            default = spec.default
            try:
                if isinstance(default, bool):
                    values[spec.name] = _boolean(var, raw)
                elif isinstance(default, int):
                    values[spec.name] = int(raw.strip())
                elif isinstance(default, float):
                    values[spec.name] = float(raw.strip())
                elif isinstance(default, Path):
                    if not raw.strip():
                        raise ConfigError(f"{var} must be a non-empty path")
                    values[spec.name] = Path(raw)
                elif spec.name in OPTIONAL_PATHS:  # empty is unset
                    values[spec.name] = Path(raw.strip()) if raw.strip() else None
                elif spec.name == "log_level":
                    values[spec.name] = raw.strip().upper()
                elif spec.name in ("history_store", "admin_auth", "event_loop", "triton_transport"):
                    values[spec.name] = raw.strip().lower()
                else:
                    values[spec.name] = raw.strip()
            except ValueError:
                kind = "an integer" if isinstance(default, int) else "a number"
                raise ConfigError(f"{var} must be {kind}, got {raw!r}") from None
        return cls(**values)  # type: ignore[arg-type]


def env_var(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _boolean(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{var} must be one of true/false (or 1/0, yes/no, on/off), got {raw!r}")


def _check(value: object, field_name: str, ok: bool, bound: str) -> None:
    if not ok:
        raise ConfigError(f"{env_var(field_name)} must be {bound}, got {value!r}")
