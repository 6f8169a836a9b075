"""Domain exceptions of the gateway.

The request pipeline raises these and knows nothing of gRPC status codes; the one table in
`server.interceptors` turns them into statuses, so the mapping cannot drift between handlers.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of the errors a request can end in; the message is safe to show to the caller."""


class InvalidArgument(GatewayError):
    """A request field is out of bounds; the message names the field and the bound."""


class NotFound(GatewayError):
    """An entity the request cannot do without is unknown."""


class BackendUnavailable(GatewayError):
    """Triton is unreachable or not ready; the caller may retry with backoff."""


class Overloaded(GatewayError):
    """The gateway sheds load; the caller should retry later."""


class BackendTimeout(GatewayError):
    """The caller's deadline or the configured Triton timeout ran out."""


class BackendError(GatewayError):
    """Triton answered with an error that is not the caller's fault (maps to INTERNAL)."""


class Unauthenticated(GatewayError):
    """An admin RPC came without credentials, or with a bearer token that is not valid."""


class PermissionDenied(GatewayError):
    """An admin RPC came from an identified caller that is not allowed to call it."""


class StartupError(Exception):
    """The gateway cannot start: bad configuration or model repository files."""
