"""`grpc.health.v1` status that follows Triton's readiness of the ensemble, both ways."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from server import metrics
from server.triton_client import TritonClient

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    """Polls Triton every interval and sets the overall ("") and per-service status.

    Starts NOT_SERVING, so that no traffic arrives before the ensemble is loaded.
    """

    def __init__(
        self,
        triton: TritonClient,
        service_names: tuple[str, ...],
        poll_interval_seconds: float,
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self._triton = triton
        self._services = ("", *service_names)
        self._interval = poll_interval_seconds
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._set(False)
        self._task = asyncio.create_task(self._poll(), name="ltrec-health-poll")

    async def shutdown(self) -> None:
        """NOT_SERVING for good (graceful shutdown), then stop polling."""
        await self.servicer.enter_graceful_shutdown()
        metrics.TRITON_READY.set(0)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _poll(self) -> None:
        while True:
            try:
                ready = await self._triton.is_ensemble_ready()
            except Exception:
                logger.exception("Triton readiness poll failed")
                ready = False
            await self._set(ready)
            await asyncio.sleep(self._interval)

    async def _set(self, serving: bool) -> None:
        if serving == self._serving:
            return
        if self._serving is not None:
            logger.info(
                "Triton ensemble %s", "ready: SERVING" if serving else "not ready: NOT_SERVING"
            )
        self._serving = serving
        metrics.TRITON_READY.set(1 if serving else 0)
        for service in self._services:
            await self.servicer.set(service, SERVING if serving else NOT_SERVING)
