"""The fleet side of telemetry: a collector that stores what devices publish over MQTT,
and the ``fleet status`` table and ``fleet report`` plots over its store (SQLite or PostgreSQL).

    from toma_edge.telemetry import mqtt_settings
    from toma_edge.host.fleet.collector import Collector
    with Collector(mqtt_settings("mqtt://collector@localhost"), db="fleet.db") as c:
        c.wait(60)                                 # store for a minute
    print(c.stats)
"""

from __future__ import annotations

__all__ = ["Collector", "CollectorStats", "FleetStore", "open_store", "Reject", "StoreUnavailable",
           "fleet_status_table", "write_report"]

from .collector import Collector, CollectorStats
from .report import fleet_status_table, write_report
from .store import FleetStore, Reject, StoreUnavailable, open_store
