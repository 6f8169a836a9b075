"""Gateway workers for `server.workers.supervise` in unit tests: top-level functions (the spawned
worker processes import them), standing in for `server.app.run_worker`."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from server.config import GatewayConfig

COUNTED = 3
FAILED_CODE = 3


def counting_worker(config: GatewayConfig) -> int:
    """Counts COUNTED requests in the multiprocess directory, then runs until SIGTERM."""
    from prometheus_client import Counter  # in this process: multiprocess mode

    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    Counter("fake_requests", "Requests a fake worker answered.").inc(COUNTED)
    stop.wait(60)
    return 0 if stop.is_set() else 1


def failing_worker(config: GatewayConfig) -> int:
    """Worker 1 exits at once with FAILED_CODE; the others run as `counting_worker`."""
    if config.feedback_replica.endswith("-w1"):
        return FAILED_CODE
    return counting_worker(config)
