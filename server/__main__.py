"""`python -m server`: run the gateway configured from `LTREC_*` environment variables (and the
standard `OTEL_*` ones for traces, `server.tracing`).

Logs JSON lines on stderr from the first line (`server.logs`); exits 2 when the configuration or
the model repository files are unusable. With `LTREC_WORKERS` > 1 this process supervises that
many gateway processes on one port (`server.workers`).
"""

from __future__ import annotations

import logging
import sys

from server.app import run, run_worker
from server.config import GatewayConfig
from server.errors import StartupError
from server.logs import configure_logging
from server.workers import supervise

logger = logging.getLogger("server")


def main() -> int:
    log = configure_logging(logging.INFO)  # before the configuration: its errors are JSON too
    try:
        config = GatewayConfig.from_env()
        logging.getLogger().setLevel(config.log_level)
        log.flush_interval = config.log_flush_interval_seconds
        if config.workers > 1:
            log.stop()
            log = configure_logging(
                config.log_level, pid=True, flush_interval=config.log_flush_interval_seconds
            )
            return supervise(config, run_worker)
        return run(config)
    except StartupError as exc:
        logger.error("cannot start the gateway: %s", exc)
        return 2
    finally:
        log.stop()


if __name__ == "__main__":
    sys.exit(main())
