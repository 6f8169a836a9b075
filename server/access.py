"""Who may call what: authorisation of the admin RPCs and the per-caller concurrency limit.

The catalogue-changing and erasure RPCs (`ADMIN_METHODS`) need an allowed caller: one that sends
`authorization: Bearer <token>` with a token of the tokens directory, or that presents a client
certificate (mutual TLS) whose subject or one of whose SANs is on the allow-list. Every RPC of
the service also counts against its caller's concurrency limit; the caller is named by a valid
token, else by its certificate, else it is "anonymous" (one bucket for every unnamed caller).

`AccessInterceptor` runs inside `server.interceptors.GatewayInterceptor`: a refusal is a gateway
error like any other, so the one status table, the per-RPC metrics and the access log see it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server import metrics
from server.config import ALLOW_ALL, GatewayConfig, env_var
from server.errors import Overloaded, PermissionDenied, StartupError, Unauthenticated
from server.interceptors import Behavior, MethodInterceptor, StreamBehavior

logger = logging.getLogger(__name__)

# The RPCs that change the catalogue or erase data; every other RPC is open to any caller.
ADMIN_METHODS = frozenset({"UpsertItems", "DeleteItems", "ForgetUser"})
ANONYMOUS = "anonymous"
MIN_TOKEN_CHARS = 16
# A token's name is its file's name: a Kubernetes Secret key, and what the limiter keys on.
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
AUTHORIZATION_KEY = "authorization"
# Where gRPC's auth context puts a verified client certificate's names.
SUBJECT_KEY = "x509_subject"
SAN_KEY = "x509_subject_alternative_name"


@dataclass(frozen=True)
class Caller:
    """Who sent an RPC, as far as its credentials prove it.

    `key` names the caller for the concurrency limit (never logged or used as a label);
    `allowed`: it may call the admin RPCs; `denial`: why not (an `AUTH_DENIED_REASONS` entry).
    """

    key: str
    allowed: bool
    denial: str = ""


class Authoriser:
    """Names the caller of an RPC and decides whether it may call the admin RPCs.

    Tokens are compared as SHA-256 digests with `hmac.compare_digest`, against every configured
    token without stopping at a match, so neither a token's content nor its length nor which
    token matched shows in the time an answer takes.
    """

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        allowed_identities: Iterable[str] = (),
        *,
        allow_all: bool = False,
    ) -> None:
        self._tokens = [(name, _digest(token)) for name, token in (tokens or {}).items()]
        self._allowed = frozenset(allowed_identities)
        self._allow_all = allow_all

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Authoriser:
        """Reads the tokens directory, if any (a StartupError names what is wrong with it)."""
        tokens = load_tokens(config.admin_tokens_dir) if config.admin_tokens_dir else {}
        return cls(tokens, config.allowed_identities, allow_all=config.admin_auth == ALLOW_ALL)

    @property
    def allows_nobody(self) -> bool:
        return not (self._allow_all or self._tokens or self._allowed)

    def describe(self) -> str:
        if self._allow_all:
            return f"every caller ({env_var('admin_auth')}={ALLOW_ALL})"
        if self.allows_nobody:
            return (
                f"no caller: set {env_var('admin_tokens_dir')} or "
                f"{env_var('admin_allowed_identities')}"
            )
        return (
            f"{len(self._tokens)} bearer token(s) and "
            f"{len(self._allowed)} client certificate identities"
        )

    def identify(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Caller:
        """The caller of an RPC from its metadata and its TLS auth context."""
        presented = [value for key, value in metadata if key == AUTHORIZATION_KEY]
        token_name = self._token_name(presented) if presented else None
        subject = _first(auth_context.get(SUBJECT_KEY, ()))
        sans = [_text(san) for san in auth_context.get(SAN_KEY, ())]
        certified = subject or (sans[0] if sans else "")
        if token_name is not None:
            key = f"token:{token_name}"
        elif certified:
            key = f"certificate:{certified}"
        else:
            key = ANONYMOUS
        if (
            self._allow_all
            or token_name is not None
            or any(name in self._allowed for name in (subject, *sans) if name)
        ):
            return Caller(key, allowed=True)
        if presented:
            return Caller(key, allowed=False, denial="invalid_token")
        if certified:
            return Caller(key, allowed=False, denial="not_allowed")
        return Caller(key, allowed=False, denial="missing_credentials")

    def _token_name(self, presented: list[str | bytes]) -> str | None:
        """The name of the configured token presented (None: none, or not one valid header)."""
        if len(presented) != 1:
            return None
        scheme, _, token = _text(presented[0]).strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = _digest(token)
        found = None
        for name, expected in self._tokens:
            if hmac.compare_digest(digest, expected):
                found = name
        return found


def load_tokens(directory: Path) -> dict[str, str]:
    """The tokens of a directory: each regular file one token, named by the file name (a
    Kubernetes Secret mounted as a volume: one file per key; dot-files are its bookkeeping)."""
    variable = env_var("admin_tokens_dir")
    try:
        entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise StartupError(f"{variable}: cannot list {directory}: {exc.strerror}") from exc
    tokens: dict[str, str] = {}
    for path in entries:
        if not path.is_file():
            continue
        if not TOKEN_NAME.fullmatch(path.name):
            raise StartupError(
                f"{variable}: token file name {path.name!r} must match {TOKEN_NAME.pattern}"
            )
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise StartupError(f"{variable}: cannot read the token {path.name}: {exc}") from exc
        # The token itself is never echoed.
        if len(token) < MIN_TOKEN_CHARS or not (
            token.isascii() and token.isprintable() and " " not in token
        ):
            raise StartupError(
                f"{variable}: token {path.name} must be at least {MIN_TOKEN_CHARS} printable "
                "ASCII characters without spaces"
            )
        if token in tokens.values():
            raise StartupError(f"{variable}: token {path.name} is the same as another token")
        tokens[path.name] = token
    if not tokens:
        raise StartupError(f"{variable}: {directory} holds no token files")
    return tokens


class CallerLimiter:
    """At most `limit` RPCs in flight per caller key; 0: no limit. Callers with nothing in flight
    are forgotten, so the table holds at most one entry per RPC in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        if not self.limit:
            return True
        count = self._in_flight.get(key, 0)
        if count >= self.limit:
            return False
        self._in_flight[key] = count + 1
        return True

    def release(self, key: str) -> None:
        if not self.limit:
            return
        count = self._in_flight.pop(key) - 1
        if count:
            self._in_flight[key] = count

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)


class AccessInterceptor(MethodInterceptor):
    """Authorises the admin RPCs and applies the per-caller limit to every RPC of the services
    (health and reflection are open to all, and unlimited)."""

    def __init__(
        self, service_names: tuple[str, ...], authoriser: Authoriser, limiter: CallerLimiter
    ) -> None:
        super().__init__(service_names)
        self._authoriser = authoriser
        self._limiter = limiter

    @contextlib.contextmanager
    def _admitted(self, method: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
        """Raises the refusal of an RPC, or holds its caller's slot while it runs."""
        caller = self._authoriser.identify(
            context.invocation_metadata() or (), context.auth_context()
        )
        if method in ADMIN_METHODS and not caller.allowed:
            metrics.AUTH_DENIED_TOTAL.labels(method=method, reason=caller.denial).inc()
            if caller.denial == "not_allowed":
                raise PermissionDenied(
                    f"{method} is not allowed for this client certificate "
                    f"(its subject or SANs must be in {env_var('admin_allowed_identities')})"
                )
            if caller.denial == "invalid_token":
                raise Unauthenticated(f"{method}: the bearer token is not valid")
            raise Unauthenticated(
                f"{method} needs credentials: 'authorization: Bearer <token>' metadata "
                "or an allowed client certificate"
            )
        if not self._limiter.acquire(caller.key):
            metrics.CALLER_LIMIT_REJECTED_TOTAL.labels(method=method).inc()
            raise Overloaded(
                f"caller concurrency limit {env_var('max_concurrent_per_caller')}="
                f"{self._limiter.limit} reached; retry later"
            )
        try:
            yield
        finally:
            self._limiter.release(caller.key)

    def _unchecked(self, method: str) -> bool:
        """Whether the method's RPCs need nothing from this interceptor: not an admin RPC and no
        per-caller limit (then its handler is left as it is: no cost on Recommend's path)."""
        return method not in ADMIN_METHODS and not self._limiter.limit

    def wrap_unary(self, service: str, method: str, behavior: Behavior) -> Behavior:
        if self._unchecked(method):
            return behavior

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._admitted(method, context):
                return await behavior(request, context)

        return wrapped

    def wrap_stream(self, service: str, method: str, behavior: StreamBehavior) -> StreamBehavior:
        """A stream holds its caller's slot until it ends."""
        if self._unchecked(method):
            return behavior

        async def wrapped(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            with self._admitted(method, context):
                async for response in behavior(requests, context):
                    yield response

        return wrapped


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _first(values: Iterable[bytes]) -> str:
    for value in values:
        return _text(value)
    return ""
