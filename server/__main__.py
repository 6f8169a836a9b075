"""`python -m server`: run the gateway configured from `LTREC_*` environment variables (and the
standard `OTEL_*` ones for traces, `server.tracing`).

Logs JSON lines on stderr from the first line (`server.logs`); exits 2 when the configuration or
the model repository files are unusable.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from server.app import serve
from server.config import GatewayConfig
from server.errors import StartupError
from server.logs import configure_logging
from server.tracing import configure_tracing

logger = logging.getLogger("server")


def main() -> int:
    log = configure_logging(logging.INFO)  # before the configuration: its errors are JSON too
    provider = None
    try:
        config = GatewayConfig.from_env()
        logging.getLogger().setLevel(config.log_level)
        provider = configure_tracing()
        asyncio.run(serve(config))
    except StartupError as exc:
        logger.error("cannot start the gateway: %s", exc)
        return 2
    finally:
        if provider is not None:
            provider.shutdown()  # exports the spans still queued
        log.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
