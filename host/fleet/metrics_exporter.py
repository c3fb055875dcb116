"""The fleet as Prometheus metrics: a collector that reads the fleet store on each scrape.

    from toma_edge.host.fleet.metrics_exporter import FleetMetrics, serve_metrics
    from toma_edge.host.fleet.store import FleetStore
    metrics = FleetMetrics(FleetStore("fleet.db", create=False))
    server = serve_metrics(metrics, "127.0.0.1", 9464)   # GET http://127.0.0.1:9464/metrics
    ...
    server.close()

``toma-edge fleet collect --metrics HOST:PORT`` runs this beside the collector (and adds
the collector's own counters). Per device (labels ``fleet`` and ``device_id`` only):
``toma_edge_device_online``, ``toma_edge_device_memory_peak_bytes``,
``toma_edge_device_memory_budget_bytes``, ``toma_edge_device_memory_headroom_bytes``,
``toma_edge_device_latency_p99_seconds``, ``toma_edge_device_error_ratio``,
``toma_edge_device_last_seen_timestamp_seconds``, ``toma_edge_device_rejected_messages_total``
and ``toma_edge_device_model_info{fleet,device_id,model,version}`` (one series per device,
value 1). Per fleet: ``toma_edge_fleet_devices`` and ``toma_edge_fleet_devices_online``
(every device, whatever the cap). Per collector process (no labels; Prometheus' ``instance``
tells them apart): ``toma_edge_collector_messages_{received,stored,duplicates,rejected,
dead_lettered,retries}_total``, ``toma_edge_collector_batches_total``,
``toma_edge_collector_queued_messages``, ``toma_edge_collector_last_commit_timestamp_seconds``,
``toma_edge_collector_lag_seconds`` (now less the last commit; both absent before the first
commit) and ``toma_edge_collector_connected``. Each scrape reads the store once
(``devices()``) on a connection of the exporter's own.

Cardinality stays bounded: at most ``max_devices`` devices (default 5000, in fleet and
device id order) get per-device series on one scrape; the rest are counted in
``toma_edge_exporter_devices_omitted`` and still in the per-fleet totals. A device's
model and version live in the info metric only, so a model update replaces one series
instead of forking every other metric of the device.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector as _PromCollector

from ...errors import ConfigError
from .store import DeviceRow

__all__ = ["FleetMetrics", "MetricsServer", "serve_metrics", "parse_host_port",
           "DEFAULT_MAX_DEVICES"]

DEFAULT_MAX_DEVICES = 5000
"""Devices with per-device series on one scrape (about 10 series each)."""

_DEV = ["fleet", "device_id"]


class _Devices(Protocol):
    def devices(self, *, error_window_s: float = ...) -> list[DeviceRow]: ...


class FleetMetrics(_PromCollector):
    """A ``prometheus_client`` collector over a fleet store (see the module docstring).

    ``store``: anything with ``devices()`` (FleetStore or the PostgreSQL store), read
    under a lock, so one store connection serves concurrent scrapes. ``collector``: the
    running :class:`~toma_edge.host.fleet.collector.Collector`, or None for device
    metrics only. ``error_window_s``: the seconds of windows behind p99 and error ratio.
    """

    def __init__(self, store: _Devices, *, collector: Any | None = None,
                 max_devices: int = DEFAULT_MAX_DEVICES,
                 error_window_s: float = 3600.0) -> None:
        if max_devices < 0:
            raise ConfigError(f"max devices must be >= 0, got {max_devices}")
        self.store = store
        self.collector = collector
        self.max_devices = max_devices
        self.error_window_s = error_window_s
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        """Nothing up front: the registry must not run a scrape on register."""
        return []

    def collect(self) -> Iterator[Metric]:
        """One scrape: read the store, yield the metric families."""
        t0 = time.perf_counter()
        with self._lock:
            rows = self.store.devices(error_window_s=self.error_window_s)
        yield from self._device_families(rows)
        if self.collector is not None:
            yield from self._collector_families(self.collector, time.time())
        took = GaugeMetricFamily("toma_edge_exporter_scrape_duration_seconds",
                                 "Seconds this exporter took to read the fleet store")
        took.add_metric([], time.perf_counter() - t0)
        yield took

    # -- devices --------------------------------------------------------------------------
    def _device_families(self, rows: list[DeviceRow]) -> Iterator[Metric]:
        total = GaugeMetricFamily("toma_edge_fleet_devices",
                                  "Devices of the fleet known to the store", labels=["fleet"])
        online = GaugeMetricFamily("toma_edge_fleet_devices_online",
                                   "Devices of the fleet whose last status is online",
                                   labels=["fleet"])
        per_fleet: dict[str, list[int]] = {}
        for r in rows:
            c = per_fleet.setdefault(r.fleet, [0, 0])
            c[0] += 1
            c[1] += 1 if r.online else 0
        for f, (n, on) in sorted(per_fleet.items()):
            total.add_metric([f], n)
            online.add_metric([f], on)
        yield total
        yield online

        shown = rows[: self.max_devices]
        omitted = GaugeMetricFamily(
            "toma_edge_exporter_devices_omitted",
            "Devices left without per-device series on this scrape (over the cap)")
        omitted.add_metric([], len(rows) - len(shown))
        yield omitted

        fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "online": GaugeMetricFamily(
                "toma_edge_device_online", "1 if the device's last status is online, else 0",
                labels=_DEV),
            "peak": GaugeMetricFamily(
                "toma_edge_device_memory_peak_bytes",
                "Peak RSS of the device's last telemetry window, bytes", labels=_DEV),
            "budget": GaugeMetricFamily(
                "toma_edge_device_memory_budget_bytes", "Memory budget of the device, bytes",
                labels=_DEV),
            "headroom": GaugeMetricFamily(
                "toma_edge_device_memory_headroom_bytes",
                "Budget less the last window's peak RSS, bytes (negative: over budget)",
                labels=_DEV),
            "p99": GaugeMetricFamily(
                "toma_edge_device_latency_p99_seconds",
                "p99 latency of the device's last window that served requests, seconds",
                labels=_DEV),
            "errors": GaugeMetricFamily(
                "toma_edge_device_error_ratio",
                "Errors per request over the device's recent windows", labels=_DEV),
            "seen": GaugeMetricFamily(
                "toma_edge_device_last_seen_timestamp_seconds",
                "When the device's last message was received, unix seconds", labels=_DEV),
            "rejected": CounterMetricFamily(
                "toma_edge_device_rejected_messages",
                "Messages of the device the collector could not store", labels=_DEV),
        }
        info = InfoMetricFamily("toma_edge_device_model", "Model and version a device runs",
                                labels=_DEV)
        for r in shown:
            key = [r.fleet, r.device_id]
            if r.online is not None:
                fams["online"].add_metric(key, 1.0 if r.online else 0.0)
            if r.peak_rss_bytes is not None:
                fams["peak"].add_metric(key, r.peak_rss_bytes)
            if r.budget_bytes is not None:
                fams["budget"].add_metric(key, r.budget_bytes)
            if r.headroom_bytes is not None:
                fams["headroom"].add_metric(key, r.headroom_bytes)
            if r.latency_p99_s is not None:
                fams["p99"].add_metric(key, r.latency_p99_s)
            if r.error_rate is not None:
                fams["errors"].add_metric(key, r.error_rate)
            if r.last_seen is not None:
                fams["seen"].add_metric(key, r.last_seen)
            fams["rejected"].add_metric(key, r.rejected)
            info.add_metric(key, {"model": r.model or "", "version": r.model_version or ""})
        yield from fams.values()
        yield info

    # -- the collector process -------------------------------------------------------------
    @staticmethod
    def _collector_families(col: Any, now: float) -> Iterator[Metric]:
        s = col.stats
        counters = [
            ("received", "Messages received from the broker", s.received),
            ("stored", "Telemetry and event rows newly stored", s.stored),
            ("duplicates", "Messages already stored (redeliveries), ignored", s.duplicates),
            ("rejected", "Messages that could not be decoded, acknowledged and dropped",
             s.rejected),
            ("dead_lettered", "Records the database refused, kept in the rejects table",
             s.dead_lettered),
            ("retries", "Batch commits retried while the store was unavailable", s.retries),
        ]
        for name, doc, value in counters:
            c = CounterMetricFamily(f"toma_edge_collector_messages_{name}", doc)
            c.add_metric([], value)
            yield c
        batches = CounterMetricFamily("toma_edge_collector_batches",
                                      "Batches committed to the store")
        batches.add_metric([], s.batches)
        yield batches
        queued = GaugeMetricFamily("toma_edge_collector_queued_messages",
                                   "Messages received and not yet committed")
        queued.add_metric([], s.queued)
        yield queued
        last = s.last_commit_at
        if last is not None:
            ts = GaugeMetricFamily("toma_edge_collector_last_commit_timestamp_seconds",
                                   "When the collector last committed a batch, unix seconds")
            ts.add_metric([], last)
            yield ts
            lag = GaugeMetricFamily(
                "toma_edge_collector_lag_seconds",
                "Seconds since the collector last committed a batch (also grows while the "
                "fleet is quiet: alert on it together with queued messages)")
            lag.add_metric([], max(0.0, now - last))
            yield lag
        up = GaugeMetricFamily("toma_edge_collector_connected",
                               "1 while the collector's broker session is up")
        up.add_metric([], 1.0 if col.connected else 0.0)
        yield up


def parse_host_port(value: str, *, option: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) into a host and a port; ConfigError naming
    ``option`` otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {value!r} must be HOST:PORT, like 127.0.0.1:9464")
    return host, int(port)


class MetricsServer:
    """The ``/metrics`` HTTP server of :func:`serve_metrics` (a thread of its own)."""

    def __init__(self, server: Any, thread: threading.Thread, host: str, port: int) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port = port

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(metrics: FleetMetrics, host: str, port: int) -> MetricsServer:
    """Serve ``metrics`` (on a registry of its own) at http://HOST:PORT/metrics; a port
    that cannot be bound is one ConfigError before anything else starts."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} for --metrics: "
                          f"{e.strerror or e}; pick another HOST:PORT") from e
    return MetricsServer(server, thread, host, port)
