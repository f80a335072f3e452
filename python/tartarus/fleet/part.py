"""What the fleet's intake and placement both work with: the shared state, the settings,
the records, the error stream and the metrics."""

from __future__ import annotations

from tartarus.fleet.error_stream import ErrorStream
from tartarus.fleet.metrics import FleetMetrics
from tartarus.fleet.records import Records
from tartarus.fleet.settings import FleetSettings
from tartarus.fleet.state import FleetState


class FleetPart:
    def __init__(
        self,
        state: FleetState,
        settings: FleetSettings,
        records: Records,
        errors: ErrorStream,
        metrics: FleetMetrics,
    ) -> None:
        self.state = state
        self.settings = settings
        self.records = records
        self.errors = errors
        self.metrics = metrics
