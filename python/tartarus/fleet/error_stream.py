"""What goes wrong in the fleet goes to the error stream (Cocytus), counted by category
in the scaler metrics."""

from __future__ import annotations

import logging
import traceback

from tartarus.enforcement.records import ErrorCategory, ErrorRecord
from tartarus.fleet.metrics import FleetMetrics
from tartarus.fleet.state import FleetState

log = logging.getLogger(__name__)


class ErrorStream:
    def __init__(self, state: FleetState, metrics: FleetMetrics) -> None:
        self.state = state
        self.metrics = metrics

    async def error(
        self,
        category: ErrorCategory,
        message: str,
        *,
        sandbox_id: str = "",
        node_id: str = "",
        trace: bool = False,
    ) -> None:
        """Records an error of this server; a failure to record it is only logged."""
        self.metrics.errors.labels(category.value).inc()
        try:
            await self.state.errors.append(
                ErrorRecord(
                    category=category,
                    message=message,
                    sandbox_id=sandbox_id,
                    node_id=node_id,
                    trace=traceback.format_exc() if trace else "",
                )
            )
        except Exception:
            log.exception("could not record an error in the error stream: %s", message)

    async def append(self, record: ErrorRecord) -> None:
        """Records an error a node reported."""
        self.metrics.errors.labels(record.category.value).inc()
        await self.state.errors.append(record)
