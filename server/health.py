"""`grpc.health.v1` status that follows Triton's readiness of the ensemble, both ways, and
whether Triton serves the model this gateway loaded.

A gateway paired with a Triton of another model version would send catalogue indices of one
export to the models of another: while the version or content hash that Triton's ensemble
config carries (`ltrec_core.contract.MODEL_VERSION_PARAMETER`, written by the export) differs
from the metadata file the gateway loaded, it reports NOT_SERVING, so readiness probes and
health-checking balancers keep callers away, and re-checks every poll until they match.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from server import metrics
from server.triton_client import ModelIdentity, TritonClient

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    """Polls Triton every interval and sets the overall ("") and per-service status.

    Starts NOT_SERVING, so that no traffic arrives before the ensemble is loaded. `expected` is
    the identity of the repository the gateway loaded; None (a repository exported before the
    export wrote one) skips the comparison.
    """

    def __init__(
        self,
        triton: TritonClient,
        service_names: tuple[str, ...],
        poll_interval_seconds: float,
        expected: ModelIdentity | None = None,
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self._triton = triton
        self._services = ("", *service_names)
        self._interval = poll_interval_seconds
        self._expected = expected
        self._serving: bool | None = None
        self._served: ModelIdentity | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        metrics.MODEL_VERSION_MISMATCH.set(0)
        metrics.TRITON_READY.set(0)
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

    async def check(self) -> bool:
        """One poll: whether the ensemble is ready and serves the model this gateway loaded."""
        try:
            ready = await self._triton.is_ensemble_ready()
        except Exception:
            logger.exception("Triton readiness poll failed")
            ready = False
        metrics.TRITON_READY.set(1 if ready else 0)
        if not ready or self._expected is None:
            return ready
        served = await self._triton.served_identity()
        if served is None:  # could not ask: not known to be the right model
            return False
        matches = served == self._expected
        metrics.MODEL_VERSION_MISMATCH.set(0 if matches else 1)
        if served != self._served:
            self._served = served
            if matches:
                logger.info("Triton serves model %s, as loaded", served.short())
            else:
                logger.warning(
                    "Triton serves model %s, this gateway loaded %s: NOT_SERVING until they match",
                    served.short(),
                    self._expected.short(),
                )
        return matches

    async def _poll(self) -> None:
        while True:
            await self._set(await self.check())
            await asyncio.sleep(self._interval)

    async def _set(self, serving: bool) -> None:
        if serving == self._serving:
            return
        if self._serving is not None:
            logger.info("%s", "SERVING" if serving else "NOT_SERVING")
        self._serving = serving
        for service in self._services:
            await self.servicer.set(service, SERVING if serving else NOT_SERVING)
