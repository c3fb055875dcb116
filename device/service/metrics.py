"""Service counters and their Prometheus exposition (``GET /metrics``), through the
official ``prometheus_client`` library on a registry of this service's own.

    from toma_edge.device.service.metrics import ServiceMetrics
    m = ServiceMetrics()
    m.request("http", 200, latency_s=0.004, rows=3)
    m.batch(rows=24, requests=8, seconds=0.0011)
    print(m.render(gauges={"toma_edge_queue_rows": 0}))   # Prometheus text format

Recording runs on every request, so the labelled children are looked up once and kept
(``prometheus_client`` then costs about 1.2 us a request here, against 3 us with a
``labels()`` lookup each time).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# no *_created samples: a device's scrape stays small, and start time is in uptime
disable_created_metrics()

__all__ = ["LATENCY_BUCKETS_S", "ServiceMetrics", "CONTENT_TYPE"]

#: what ``GET /metrics`` answers with (Prometheus text format 0.0.4)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0)
"""Upper bounds of the request latency histogram, in seconds (+Inf is added)."""


#: the labels of ``toma_edge_model_info``
INFO_LABELS = ("name", "version", "sha256")


class ServiceMetrics:
    """The counters of one service process (thread-safe: prometheus_client locks)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "toma_edge_requests", "Inference requests answered, by transport and status code.",
            ["transport", "code"], registry=r)
        self._latency = Histogram(
            "toma_edge_request_latency_seconds", "Time from a request's arrival to its answer.",
            ["transport"], buckets=LATENCY_BUCKETS_S, registry=r)
        self._rows = Counter("toma_edge_rows", "Input rows answered.", registry=r)
        self._batches = Counter("toma_edge_batches", "Model calls (micro-batches) run.", registry=r)
        self._batch_requests = Counter(
            "toma_edge_batch_requests", "Requests carried by those model calls.", registry=r)
        self._model_seconds = Counter(
            "toma_edge_model_seconds", "Seconds spent in model calls.", registry=r)
        self._updates = Counter(
            "toma_edge_model_updates", "Model updates, by result.", ["result"], registry=r)
        self._info = Gauge("toma_edge_model_info", "The serving model (value always 1).",
                           list(INFO_LABELS), registry=r)
        self._gauges: dict[str, Gauge] = {}
        self._req_children: dict[tuple[str, int], Any] = {}
        self._lat_children: dict[str, Any] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._info_labels: tuple[str, ...] | None = None
        for k in ("ok", "refused"):
            self._updates.labels(k)

    def request(self, transport: str, code: int, *, latency_s: float, rows: int) -> None:
        """Count one answered request (``code``: the HTTP status, or its equivalent for
        MQTT) that took ``latency_s`` seconds for ``rows`` rows."""
        key = (transport, code)
        child = self._req_children.get(key)
        if child is None:
            child = self._req_children[key] = self._requests.labels(transport, str(code))
        child.inc()
        self._counts[key] = self._counts.get(key, 0) + 1
        lat = self._lat_children.get(transport)
        if lat is None:
            lat = self._lat_children[transport] = self._latency.labels(transport)
        lat.observe(latency_s)
        if code < 400:
            self._rows.inc(rows)

    def batch(self, *, rows: int, requests: int, seconds: float) -> None:
        """Count one model call of ``rows`` rows from ``requests`` requests (``seconds`` s)."""
        self._batches.inc()
        self._batch_requests.inc(requests)
        self._model_seconds.inc(seconds)

    def swap(self, ok: bool) -> None:
        """Count one model update that went live (``ok``) or was refused."""
        self._updates.labels("ok" if ok else "refused").inc()

    def requests_total(self, transport: str | None = None, code: int | None = None) -> int:
        """Answered requests, optionally of one transport and/or status code."""
        return sum(n for (t, c), n in list(self._counts.items())
                   if (transport is None or t == transport) and (code is None or c == code))

    def render(self, *, gauges: Mapping[str, float] | None = None,
               info: Mapping[str, str] | None = None) -> str:
        """The Prometheus text exposition of every counter, plus ``gauges`` (name -> value)
        and the model ``info`` labels (``toma_edge_model_info``)."""
        for name, v in (gauges or {}).items():
            g = self._gauges.get(name)
            if g is None:
                text = name.replace("toma_edge_", "").replace("_", " ") + "."
                g = self._gauges[name] = Gauge(name, text, registry=self.registry)
            g.set(v)
        if info:
            labels = tuple(str(info.get(k, "")) for k in INFO_LABELS)
            if labels != self._info_labels:
                self._info.clear()
                self._info.labels(*labels).set(1)
                self._info_labels = labels
        return generate_latest(self.registry).decode()
