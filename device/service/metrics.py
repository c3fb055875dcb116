"""Service counters and their Prometheus text exposition (``GET /metrics``).

    from toma_edge.device.service.metrics import ServiceMetrics
    m = ServiceMetrics()
    m.request("http", 200, latency_s=0.004, rows=3)
    m.batch(rows=24, requests=8, seconds=0.0011)
    print(m.render(gauges={"toma_edge_queue_rows": 0}))   # text format 0.0.4

Recording is a few integer updates under one lock (it runs on every request); rendering
walks the counters once per scrape. The exposition format is Prometheus' plain text
format 0.0.4: ``# HELP``/``# TYPE`` lines, then ``name{labels} value`` samples;
latencies are histograms in seconds with cumulative ``le`` buckets.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping

__all__ = ["LATENCY_BUCKETS_S", "ServiceMetrics"]

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0)
"""Upper bounds of the request latency histogram, in seconds (+Inf is added)."""


def _labels(d: Mapping[str, object]) -> str:
    if not d:
        return ""
    parts = []
    for k, v in d.items():
        s = str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{s}"')
    return "{" + ",".join(parts) + "}"


class _Histogram:
    __slots__ = ("counts", "total", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, v)] += 1
        self.total += v
        self.n += 1


class ServiceMetrics:
    """Thread-safe counters of one service process. See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, _Histogram] = {}
        self.rows = 0
        self.batches = 0
        self.batch_requests = 0
        self.batch_seconds = 0.0
        self.swaps: dict[str, int] = {"ok": 0, "refused": 0}

    def request(self, transport: str, code: int, *, latency_s: float, rows: int) -> None:
        """Count one answered request (``code``: the HTTP status, or its equivalent for
        MQTT) that took ``latency_s`` seconds for ``rows`` rows."""
        key = (transport, code)
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1
            h = self._latency.get(transport)
            if h is None:
                h = self._latency[transport] = _Histogram()
            h.observe(latency_s)
            if code < 400:
                self.rows += rows

    def batch(self, *, rows: int, requests: int, seconds: float) -> None:
        """Count one model call of ``rows`` rows from ``requests`` requests (``seconds`` s)."""
        with self._lock:
            self.batches += 1
            self.batch_requests += requests
            self.batch_seconds += seconds

    def swap(self, ok: bool) -> None:
        """Count one model update that went live (``ok``) or was refused."""
        with self._lock:
            self.swaps["ok" if ok else "refused"] += 1

    def requests_total(self, transport: str | None = None, code: int | None = None) -> int:
        """Answered requests, optionally of one transport and/or status code."""
        with self._lock:
            return sum(n for (t, c), n in self._requests.items()
                       if (transport is None or t == transport) and (code is None or c == code))

    def render(self, *, gauges: Mapping[str, float] | None = None,
               info: Mapping[str, str] | None = None) -> str:
        """The Prometheus text exposition of every counter, plus ``gauges`` (name -> value)
        and the model ``info`` labels (``toma_edge_model_info``)."""
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            head("toma_edge_requests_total", "counter", "Inference requests answered, by transport and status code.")
            for (t, c), n in sorted(self._requests.items()):
                out.append(f"toma_edge_requests_total{_labels({'transport': t, 'code': c})} {n}")
            head("toma_edge_request_latency_seconds", "histogram", "Time from a request's arrival to its answer.")
            for t, h in sorted(self._latency.items()):
                cum = 0
                for le, cnt in zip((*map(repr, LATENCY_BUCKETS_S), "+Inf"), h.counts, strict=True):
                    cum += cnt
                    out.append(f"toma_edge_request_latency_seconds_bucket{_labels({'transport': t, 'le': le})} {cum}")
                out.append(f"toma_edge_request_latency_seconds_sum{_labels({'transport': t})} {h.total!r}")
                out.append(f"toma_edge_request_latency_seconds_count{_labels({'transport': t})} {h.n}")
            head("toma_edge_rows_total", "counter", "Input rows answered.")
            out.append(f"toma_edge_rows_total {self.rows}")
            head("toma_edge_batches_total", "counter", "Model calls (micro-batches) run.")
            out.append(f"toma_edge_batches_total {self.batches}")
            head("toma_edge_batch_requests_total", "counter", "Requests carried by those model calls.")
            out.append(f"toma_edge_batch_requests_total {self.batch_requests}")
            head("toma_edge_model_seconds_total", "counter", "Seconds spent in model calls.")
            out.append(f"toma_edge_model_seconds_total {self.batch_seconds!r}")
            head("toma_edge_model_updates_total", "counter", "Model updates, by result.")
            for k, n in self.swaps.items():
                out.append(f"toma_edge_model_updates_total{_labels({'result': k})} {n}")
        for name, v in (gauges or {}).items():
            head(name, "gauge", name.replace("toma_edge_", "").replace("_", " ") + ".")
            out.append(f"{name} {v!r}" if isinstance(v, float) else f"{name} {v}")
        if info:
            head("toma_edge_model_info", "gauge", "The serving model (value always 1).")
            out.append(f"toma_edge_model_info{_labels(info)} 1")
        return "\n".join(out) + "\n"
