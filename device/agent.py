"""The device's telemetry agent: status, telemetry windows and events over MQTT, losing nothing.

    from toma_edge.telemetry import mqtt_settings
    from toma_edge.device.agent import TelemetryAgent
    agent = TelemetryAgent(mqtt_settings("mqtt://pi-0042@broker.lan"), fleet="plant-7",
                           device_id="pi-0042", spool="/var/lib/toma-edge/spool.db")
    agent.record_request(0.012, rows=8); agent.close()

Every telemetry window and event goes first into the on-disk :class:`~.spool.Spool`, and
leaves it only once the broker acknowledged it (QoS 1 PUBACK), so broker outages and
device restarts (SIGKILL included) lose nothing; ``seq`` continues across restarts.
On connect the agent publishes a retained birth on ``status``; its Last Will (and
:meth:`TelemetryAgent.close`) set it offline. :meth:`TelemetryAgent.close` stops at once
when no collector takes the messages: what is not acknowledged stays spooled and leaves on
the next start. The agent's connection is the device's only one (a broker that binds
client ids to usernames allows one per identity): the inference front end shares it
(:meth:`TelemetryAgent.share_connection`). No exception of a paho callback reaches paho's
network thread: each is caught, counted (:meth:`TelemetryAgent.health`) and logged at
most once a minute. The inference service calls
:meth:`~TelemetryAgent.record_request` per request and :meth:`~TelemetryAgent.event`,
:meth:`~TelemetryAgent.set_model`, :meth:`~TelemetryAgent.set_batch_size` as things change.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import random
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._validation import describe_validation_error
from ..errors import TelemetryError
from ..telemetry import (
    EventMessage,
    MqttSettings,
    StatusMessage,
    TelemetryMessage,
    connect_properties,
    make_client,
    topic,
    validate_id,
)
from .spool import Spool, SpoolRow

__all__ = [
    "TelemetryAgent",
    "RequestWindow",
    "StatsSource",
    "MemorySource",
    "ConnectionHook",
    "read_cpu_temp_c",
]

log = logging.getLogger("toma_edge.telemetry")

StatsSource = Callable[[], Mapping[str, Any]]
"""Returns extra :class:`TelemetryMessage` fields for the window being closed (e.g.
``{"batch_size": 32}``); it overrides what the agent measured itself."""
MemorySource = Callable[[], tuple[int, int]]
"""Returns ``(rss_bytes, peak_rss_bytes)``: RSS now and the peak since the last call."""
ConnectionHook = Callable[[bool], None]
"""Called with True when the agent (re)connects to the broker, False when it loses it."""

_AGENT = "toma-edge-agent/1"
_NO_MATCHING_SUBSCRIBERS = 16  # MQTT v5 PUBACK reason code 0x10


class ThrottledLog:
    """Logs a kind of problem once, then at most once per ``interval_s`` seconds with the
    number of occurrences in between, so a flood of bad messages costs no log flood."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self._log = logger
        self._interval = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, level: int, key: str, msg: str, *args: object,
                 exc_info: bool = False) -> None:
        """Log ``msg % args`` under ``key`` unless the same key was logged recently."""
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(key, (-1e18, 0))
            if now - last < self._interval:
                self._last[key] = (last, skipped + 1)
                return
            self._last[key] = (now, 0)
        if skipped:
            msg += f" ({skipped} more like this in the last {self._interval:.0f} s)"
        self._log.log(level, msg, *args, exc_info=exc_info)


class RequestWindow:
    """Thread-safe statistics of the requests of one telemetry window.

    Keeps at most ``max_samples`` latencies per window (a uniform reservoir sample beyond
    that), so a busy window costs bounded memory.
    """

    def __init__(self, *, max_samples: int = 50_000) -> None:
        self._lock = threading.Lock()
        self._max = max_samples
        self._reset(time.time())

    def _reset(self, now: float) -> None:
        self._start = now
        self._lat: list[float] = []
        self._seen = 0
        self._requests = 0
        self._errors = 0
        self._rows = 0
        self._max_lat = 0.0

    def record(self, latency_s: float, rows: int, *, error: bool = False) -> None:
        """Count one request of ``rows`` rows that took ``latency_s`` seconds."""
        # called once per request on the service's loop: keep it to a few operations
        with self._lock:
            self._requests += 1
            if rows > 0:
                self._rows += rows
            if error:
                self._errors += 1
            if not latency_s >= 0.0:  # negative or NaN: count the request, not its latency
                return
            if latency_s > self._max_lat:
                self._max_lat = latency_s
            self._seen += 1
            if len(self._lat) < self._max:
                self._lat.append(latency_s)
            else:
                j = random.randrange(self._seen)
                if j < self._max:
                    self._lat[j] = latency_s

    def snapshot(self) -> dict[str, Any]:
        """Close the window: its :class:`TelemetryMessage` fields, then start a new one."""
        now = time.time()
        with self._lock:  # take the window and start a new one; the work happens outside
            lat, start, requests = self._lat, self._start, self._requests
            errors, rows, max_lat = self._errors, self._rows, self._max_lat
            self._reset(now)
        lat.sort()
        window_s = max(0.0, now - start)
        out: dict[str, Any] = {
            "window_s": window_s,
            "requests": requests,
            "errors": errors,
            "rows": rows,
            "throughput_rps": requests / window_s if window_s > 0 else 0.0,
            "rows_per_s": rows / window_s if window_s > 0 else 0.0,
        }
        if lat:
            out.update(
                latency_p50_s=_quantile(lat, 0.50),
                latency_p95_s=_quantile(lat, 0.95),
                latency_p99_s=_quantile(lat, 0.99),
                latency_max_s=max_lat,
            )
        return out


def _quantile(sorted_values: list[float], q: float) -> float:
    # nearest-rank: a latency that some request really had
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values) - 1e-9) - 1))
    return sorted_values[k]


def _acked(info: Any) -> bool:
    """Whether the broker acknowledged a QoS 1 message handed to paho."""
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        # paho raises when publish() met a dropped connection (rc recorded then), though it
        # keeps the message, resends it after reconnecting and marks it on PUBACK
        return bool(getattr(info, "_published", False))


def _default_memory() -> tuple[int, int]:
    import psutil

    rss = int(psutil.Process().memory_info().rss)
    # ru_maxrss is the kernel's running maximum for this process (KiB on Linux, bytes on
    # macOS): never reset by anyone, so no reader hides a peak from another
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    peak = peak if sys.platform == "darwin" else peak * 1024
    return rss, max(rss, peak)


def _probe_memory_source() -> tuple[MemorySource, Callable[[], None]]:
    """RSS now and the peak RSS since the previous reading (the telemetry window), from
    the process-wide probe of toma_edge.probes (which folds other readers' resets in);
    the kernel's ru_maxrss where that module is missing. Returns (source, close)."""
    try:
        from .. import probes
    except ImportError:
        return _default_memory, lambda: None
    reader = probes.peak_probe().reader()

    def read() -> tuple[int, int]:
        rss = probes.rss_bytes()
        return rss, max(rss, reader.take()[0])

    return read, reader.close


_CPU_ZONES = ("cpu-thermal", "cpu_thermal", "x86_pkg_temp", "soc_thermal", "cpu")


def read_cpu_temp_c(root: str = "/sys/class/thermal") -> float | None:
    """The CPU temperature in degrees Celsius from Linux thermal zones, None where absent."""
    zones = sorted(glob.glob(os.path.join(root, "thermal_zone*")))
    best: str | None = None
    for z in zones:
        try:
            kind = Path(z, "type").read_text().strip().lower()
        except OSError:
            continue
        if any(k in kind for k in _CPU_ZONES):
            best = z
            break
        best = best or z
    if best is None:
        return None
    try:
        return int(Path(best, "temp").read_text().strip()) / 1000.0
    except (OSError, ValueError):
        return None


class TelemetryAgent:
    """Publishes a device's status, telemetry and events; see the module docstring.

    ``settings`` None keeps everything in the spool (nothing is sent). ``interval_s`` is
    the telemetry window in seconds (None: no timer, call :meth:`emit_telemetry`).
    ``budget_bytes`` is the process's memory budget reported next to RSS.
    ``max_spool_messages`` bounds the spool (oldest telemetry dropped first, counted).
    ``retry_s`` is how long a message no collector subscribed to waits before it is sent
    again (seconds).
    """

    def __init__(
        self,
        settings: MqttSettings | None,
        *,
        fleet: str,
        device_id: str,
        spool: str | Path,
        interval_s: float | None = 10.0,
        budget_bytes: int | None = None,
        target: str | None = None,
        stats_source: StatsSource | None = None,
        memory_source: MemorySource | None = None,
        on_connection_change: ConnectionHook | None = None,
        client_id: str | None = None,
        max_spool_messages: int = 100_000,
        max_inflight: int = 100,
        retry_s: float = 1.0,
        start: bool = True,
    ) -> None:
        self.fleet = validate_id(fleet, what="fleet")
        self.device_id = validate_id(device_id)
        if interval_s is not None and not interval_s > 0:
            raise TelemetryError(f"telemetry interval must be > 0 seconds, got {interval_s}")
        self.interval_s = interval_s
        self.budget_bytes = budget_bytes
        self.target = target
        self._settings = settings
        self._stats_source = stats_source
        self._close_memory: Callable[[], None] = lambda: None
        if memory_source is None:
            memory_source, self._close_memory = _probe_memory_source()
        self._memory = memory_source
        self._on_conn = on_connection_change
        self._spool = Spool(spool, max_messages=max_spool_messages)
        self._window = RequestWindow()
        self._topics = {k: topic(self.fleet, self.device_id, k) for k in
                        ("status", "telemetry", "events")}  # type: ignore[arg-type]
        self._model: tuple[str | None, str | None, str | None] = (None, None, None)
        self._batch_size: int | None = None
        self._max_inflight = max_inflight
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._rejected = 0
        self._unrouted: deque[int] = deque()
        self._retry_s = retry_s
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._client: Any = None
        self._callback_errors = 0
        self._connects = 0
        self._retry_pending = False
        self._shared: list[tuple[Callable[[Any], None], Callable[[], None]]] = []
        self._connack_props: Any = None
        self._shared_lock = threading.Lock()
        self._throttled = ThrottledLog(log)
        if settings is not None:
            cid = client_id or f"toma-edge-{self.fleet}-{self.device_id}"
            # room for the inference answers that share this connection beside telemetry
            self._client = make_client(settings, client_id=cid,
                                       max_inflight=max_inflight + 100)
            self._client.will_set(
                self._topics["status"], self._status(online=False).encode(), qos=1, retain=True
            )
            self._client.on_connect = self._on_connect
            self._client.on_disconnect = self._on_disconnect
            self._client.on_publish = self._on_publish
        if start:
            self.start()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Connect (in the background, retrying) and start the sender and timer threads."""
        if self._threads:
            return
        if self._client is not None:
            s = self._settings
            assert s is not None
            try:
                self._client.connect_async(
                    s.url.host, s.url.port, keepalive=s.keepalive_s, clean_start=True,
                    properties=connect_properties(),
                )
            except (OSError, ValueError) as e:
                raise TelemetryError(f"cannot reach MQTT broker {s.url}: {e}") from e
            self._client.loop_start()
            self._threads.append(threading.Thread(
                target=self._sender, name="toma-edge-telemetry-sender", daemon=True))
        if self.interval_s is not None:
            self._threads.append(threading.Thread(
                target=self._timer, name="toma-edge-telemetry-timer", daemon=True))
        for t in self._threads:
            t.start()

    @property
    def connected(self) -> bool:
        """Whether the broker accepted our connection, it is up now and paho's network
        thread runs."""
        return self._connected.is_set() and self._network_alive()

    def _network_alive(self) -> bool:
        t = getattr(self._client, "_thread", None)
        return t is None or t.is_alive()

    @property
    def callback_errors(self) -> int:
        """Exceptions caught in paho callbacks (each would have stopped paho's thread)."""
        return self._callback_errors

    def health(self) -> dict[str, object]:
        """The agent's side of /healthz: connection, spool, counted problems."""
        return {
            "connected": self.connected,
            "network_thread_alive": self._client is None or self._network_alive(),
            "connects": self._connects,
            "spooled": self._spool.pending(),
            "rejected": self._rejected,
            "callback_errors": self._callback_errors,
        }

    @property
    def client(self) -> Any:
        """The paho client of the device's broker connection (None without a broker)."""
        return self._client

    def share_connection(self, *, on_connect: Callable[[Any], None],
                         on_disconnect: Callable[[], None]) -> Any:
        """Let another part of the device (the inference front end) use this agent's MQTT
        connection; returns the paho client (None without a broker).

        ``on_connect(connack_properties)`` runs in paho's thread after every successful
        connect (at once when connected already), ``on_disconnect()`` after every loss;
        exceptions in them are caught and counted like the agent's own. The agent still
        owns the connection: :meth:`close` ends it.
        """
        if self._client is None:
            return None
        with self._shared_lock:
            self._shared.append((on_connect, on_disconnect))
            now = self._connected.is_set()
        if now:
            self._guard("connect hook", on_connect, self._connack_props)
        return self._client

    def _guard(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        """Run a callback in paho's thread: any exception is counted and logged, never
        raised into paho's network thread."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - an exception here would stop paho's thread
            self._callback_errors += 1
            self._throttled(logging.ERROR, what, "MQTT %s failed; carrying on", what,
                            exc_info=True)

    @property
    def spool(self) -> Spool:
        """The on-disk outbox (pending count, seq counters, drops)."""
        return self._spool

    def flush(self, timeout_s: float = 10.0, *, give_up_unrouted: bool = False) -> bool:
        """Wait up to ``timeout_s`` seconds until the broker acknowledged everything spooled;
        True if the spool is empty. ``give_up_unrouted``: return False as soon as the
        broker answered "no matching subscribers" (retrying then only waits)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._spool.pending() == 0:
                return True
            if time.monotonic() >= deadline or self._client is None:
                return False
            if give_up_unrouted and self._retry_pending:
                return False
            self._wake.set()
            time.sleep(0.02)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop gracefully: deliver what is spooled (up to ``timeout_s`` seconds, but no
        longer once the broker said nobody takes it: no collector subscribed), publish
        the offline status, disconnect. What could not be delivered stays in the spool
        and leaves on the next start."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None and self._connected.is_set():
            self.flush(timeout_s, give_up_unrouted=True)
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5.0)
        if self._client is not None:
            if self._connected.is_set():
                info = self._client.publish(
                    self._topics["status"], self._status(online=False).encode(),
                    qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout=min(1.0, timeout_s))
                except (RuntimeError, ValueError):
                    pass
            self._client.disconnect()
            self._client.loop_stop()
        self._close_memory()
        self._spool.close()

    def __enter__(self) -> TelemetryAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the service's API --------------------------------------------------------------
    def record_request(self, latency_s: float, rows: int, error: bool = False) -> None:
        """Count one inference request (``latency_s`` seconds, ``rows`` rows) in this window."""
        self._window.record(latency_s, rows, error=error)

    def event(self, kind: str, **fields: str | int | float | bool | None) -> int:
        """Spool one event (``model_loaded``, ``budget_adapted``, ``error``...) with scalar
        fields; returns its events ``seq``. TelemetryError if kind or fields are invalid."""
        try:  # validate before taking a seq
            EventMessage(seq=1, ts=time.time(), kind=kind, fields=fields)
        except ValidationError as e:
            raise TelemetryError(
                f"event {kind!r} is invalid: {describe_validation_error(e)}") from e
        seq = self._spool.put(
            "events", self._topics["events"],
            lambda s: EventMessage(seq=s, ts=time.time(), kind=kind, fields=fields).encode(),
        )
        self._wake.set()
        return seq

    def set_model(self, name: str, version: str, sha256: str | None = None) -> None:
        """Say which model is loaded: an event (``model_loaded`` or ``model_swapped``) and a
        new retained status."""
        old = self._model
        self._model = (name, version, sha256)
        if old[0] is None:
            self.event("model_loaded", model=name, version=version, sha256=sha256)
        else:
            self.event("model_swapped", model=name, version=version, sha256=sha256,
                       previous_model=old[0], previous_version=old[1])
        self._publish_status()

    def set_batch_size(self, n: int) -> None:
        """Report the batch size the service now uses; a change is a ``budget_adapted`` event."""
        if n < 1:
            raise TelemetryError(f"batch size must be >= 1, got {n}")
        old, self._batch_size = self._batch_size, int(n)
        if old is not None and old != n:
            self.event("budget_adapted", batch_size=int(n), previous_batch_size=old)

    def emit_telemetry(self) -> int:
        """Close the current window now and spool its telemetry; returns its ``seq``."""
        fields = self._window.snapshot()
        try:
            rss, peak = self._memory()
            fields.update(rss_bytes=rss, peak_rss_bytes=peak)
        except Exception as e:  # a failing probe must not stop telemetry
            log.warning("memory probe failed: %s", e)
        fields.update(
            batch_size=self._batch_size, budget_bytes=self.budget_bytes,
            cpu_temp_c=read_cpu_temp_c(),
            model=self._model[0], model_version=self._model[1], model_sha256=self._model[2],
            spool_dropped=self._spool.dropped("telemetry"),
        )
        if self._stats_source is not None:
            fields.update(self._stats_source())
        now = time.time()
        try:
            TelemetryMessage(seq=1, ts=now, **fields)
        except ValidationError as e:
            raise TelemetryError(f"telemetry is invalid: {describe_validation_error(e)}") from e
        seq = self._spool.put(
            "telemetry", self._topics["telemetry"],
            lambda s: TelemetryMessage(seq=s, ts=now, **fields).encode(),
        )
        self._wake.set()
        return seq

    @property
    def rejected(self) -> int:
        """Messages the broker refused (e.g. not authorized by its ACL); dropped, logged."""
        return self._rejected

    # -- internals ----------------------------------------------------------------------
    def _status(self, *, online: bool) -> StatusMessage:
        return StatusMessage(
            online=online, ts=time.time(), model=self._model[0],
            model_version=self._model[1], model_sha256=self._model[2], target=self.target,
            budget_bytes=self.budget_bytes, interval_s=self.interval_s, agent=_AGENT,
        )

    def _publish_status(self) -> None:
        if self._client is not None and self._connected.is_set():
            self._client.publish(
                self._topics["status"], self._status(online=True).encode(), qos=1, retain=True)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self._connack_props = properties
        self._guard("connect handler", self._connect, client, reason)
        if not reason.is_failure:
            with self._shared_lock:
                hooks = [h[0] for h in self._shared]
            for hook in hooks:
                self._guard("connect hook", hook, properties)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._guard("disconnect handler", self._disconnect, reason)
        with self._shared_lock:
            hooks = [h[1] for h in self._shared]
        for hook in hooks:
            self._guard("disconnect hook", hook)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        self._guard("publish handler", self._published, mid, reason)

    def _connect(self, client: Any, reason: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT broker %s refused device %s: %s",
                        self._settings.url if self._settings else "?", self.device_id, reason)
            return
        log.info("connected to MQTT broker %s", self._settings.url if self._settings else "?")
        self._connects += 1
        self._connected.set()
        client.publish(self._topics["status"], self._status(online=True).encode(), qos=1,
                       retain=True)
        self._wake.set()
        if self._on_conn:
            self._on_conn(True)

    def _disconnect(self, reason: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stop.is_set():
            log.warning("lost MQTT broker (%s); spooling until it is back", reason)
            if self._on_conn:
                self._on_conn(False)

    def _published(self, mid: int, reason: Any) -> None:
        # runs in paho's thread under its message lock (before the message is marked
        # published): touch nothing of ours but a deque and counters
        value = getattr(reason, "value", 0)
        if value == _NO_MATCHING_SUBSCRIBERS:
            self._unrouted.append(mid)
        elif getattr(reason, "is_failure", False):
            self._rejected += 1
            self._throttled(logging.ERROR, "refused", "broker refused message %d: %s",
                            mid, reason)
        self._wake.set()

    def _sender(self) -> None:
        """Hand spooled messages to paho (a window of ``max_inflight``), delete on PUBACK.

        paho keeps unacknowledged QoS 1 messages and resends them itself after a
        reconnect, so a message is handed over once per process; after a restart the
        spool (where it still is) hands it again, and the collector drops the duplicate.
        A PUBACK saying "no matching subscribers" (no collector session holds the message,
        e.g. a restarted broker before the collectors subscribed again) is not a delivery:
        the message stays spooled and is sent again ``retry_s`` later.
        """
        inflight: deque[tuple[SpoolRow, Any]] = deque()
        retry: deque[tuple[float, SpoolRow]] = deque()
        unrouted: set[int] = set()
        cursor = 0
        warned = False
        while True:
            self._wake.wait(timeout=0.2)
            self._wake.clear()
            try:
                while self._unrouted:
                    unrouted.add(self._unrouted.popleft())
                done: list[int] = []
                waiting: deque[tuple[SpoolRow, Any]] = deque()
                now = time.monotonic()
                for row, info in inflight:
                    if not _acked(info):
                        waiting.append((row, info))
                    elif info.mid in unrouted:
                        unrouted.discard(info.mid)
                        retry.append((now + self._retry_s, row))
                        if not warned:
                            log.warning("no collector is subscribed to %s; keeping telemetry "
                                        "spooled and retrying", row.topic)
                            warned = True
                    else:
                        done.append(row.id)
                        warned = False
                inflight = waiting
                self._retry_pending = bool(retry)
                if done:
                    self._spool.delete(done)
                if self._stop.is_set():
                    return
                if not self._connected.is_set():
                    continue
                while retry and retry[0][0] <= now and len(inflight) < self._max_inflight:
                    row = retry.popleft()[1]
                    inflight.append((row, self._publish_row(row)))
                room = self._max_inflight - len(inflight)
                if room > 0 and not retry:
                    for row in self._spool.peek(after_id=cursor, limit=room):
                        inflight.append((row, self._publish_row(row)))
                        cursor = row.id
            except TelemetryError as e:  # disk full, spool gone: say so, keep trying
                self._throttled(logging.ERROR, "spool", "%s", e)
                time.sleep(1.0)
            except Exception:  # noqa: BLE001 - the sender must outlive any one failure
                self._callback_errors += 1
                self._throttled(logging.ERROR, "sender", "telemetry sender failed; carrying on",
                                exc_info=True)
                time.sleep(1.0)

    def _publish_row(self, row: SpoolRow) -> Any:
        return self._client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)

    def _timer(self) -> None:
        assert self.interval_s is not None
        while not self._stop.wait(self.interval_s):
            try:
                self.emit_telemetry()
            except TelemetryError as e:
                log.error("%s", e)

