"""`python -m server`: run the gateway configured from `LTREC_*` environment variables.

Exits 2 when the configuration or the model repository files are unusable.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import queue
import sys

from server.app import serve
from server.config import GatewayConfig
from server.errors import StartupError


def main() -> int:
    try:
        config = GatewayConfig.from_env()
    except StartupError as exc:
        print(f"cannot start the gateway: {exc}", file=sys.stderr)
        return 2
    # Log records are handed to a thread that formats and writes them, so a slow stderr never
    # blocks the event loop that serves requests.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    root = logging.getLogger()
    root.setLevel(config.log_level)
    root.addHandler(logging.handlers.QueueHandler(records))  # formats nothing; the listener does
    listener.start()
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        logging.getLogger("server").error("cannot start the gateway: %s", exc)
        return 2
    finally:
        listener.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
