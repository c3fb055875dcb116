"""The fleet collector: stores every device's status, telemetry and events exactly once.

    from toma_edge.telemetry import mqtt_settings
    from toma_edge.host.fleet.collector import Collector
    with Collector(mqtt_settings("mqtt://collector@localhost"), db="fleet.db") as c:
        c.wait(60)                                 # store for a minute, then stop
    print(c.stats.stored, c.stats.duplicates, c.stats.rejected)

Delivery (DESIGN.md, "Telemetry (MQTT)"): a persistent MQTT v5 session (clean start off,
a session expiry), paho's manual acknowledgement, and a PUBACK sent only after the
batch holding the message is committed to SQLite; so a message the broker accepted
survives a collector crash (the broker redelivers it) and a message delivered twice is
stored once (INSERT OR IGNORE on ``(fleet, device_id, seq)``). Telemetry and events come
through the shared subscription ``$share/toma-edge-collectors/...``, so several collector
processes split a fleet; ``status`` is subscribed plainly (shared subscriptions get no
retained messages). Malformed or oversized payloads are counted, logged once per device,
acknowledged and dropped.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import TelemetryError
from ...telemetry import (
    KINDS,
    MAX_PAYLOAD_BYTES,
    MqttSettings,
    connect_properties,
    decode,
    make_client,
    parse_topic,
    subscription,
)
from .store import FleetStore, Record

__all__ = ["Collector", "CollectorStats", "BatchHook", "SHARE_GROUP"]

log = logging.getLogger("toma_edge.fleet")

SHARE_GROUP = "toma-edge-collectors"

BatchHook = Callable[[int, int], None]
"""Called after each committed batch with ``(stored, duplicates)``."""


@dataclass
class CollectorStats:
    """Counters since the collector started (messages)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0


class Collector:
    """Subscribes, stores in batches, acknowledges after commit; see the module docstring.

    ``batch_size`` messages (or what arrived within ``batch_wait_s`` seconds) are
    committed in one transaction. ``session_expiry_s`` is how long the broker keeps our
    session (and queues messages for it) while we are away. Several collectors with the
    same ``share_group`` (e.g. :data:`SHARE_GROUP`) split telemetry and events through an
    MQTT v5 shared subscription; give each its own ``client_id``. Without one the
    subscription is plain: mosquitto 2.0.11 (Debian 12) does not restore shared
    subscriptions, nor the messages queued for them, when a persisting broker restarts,
    so a single collector subscribes plainly and loses nothing across broker restarts.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        db: str | Path = "fleet.db",
        client_id: str | None = None,
        fleet: str = "+",
        share_group: str | None = None,
        session_expiry_s: int = 7 * 24 * 3600,
        batch_size: int = 500,
        batch_wait_s: float = 0.05,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        on_batch: BatchHook | None = None,
    ) -> None:
        if batch_size < 1:
            raise TelemetryError(f"batch size must be >= 1, got {batch_size}")
        self.settings = settings
        self.store = FleetStore(db)
        self.client_id = client_id or f"toma-edge-collector-{socket.gethostname()}-{os.getpid()}"
        self.fleet = fleet
        self.share_group = share_group
        self.session_expiry_s = session_expiry_s
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.max_payload_bytes = max_payload_bytes
        self.stats = CollectorStats()
        self._on_batch = on_batch
        self._queue: queue.Queue[tuple[int, str, bytes, int, int]] = queue.Queue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._first_connack = threading.Event()
        self._subscribed = threading.Event()
        self._refusal: str | None = None
        self._generation = 0
        self._logged: set[tuple[str, str]] = set()
        self._writer: threading.Thread | None = None
        self._client = make_client(settings, client_id=self.client_id, manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, *, connect_timeout_s: float = 15.0) -> Collector:
        """Connect (TelemetryError if the broker is unreachable or refuses us) and start."""
        s = self.settings
        try:
            self._client.connect(
                s.url.host, s.url.port, keepalive=s.keepalive_s, clean_start=False,
                properties=connect_properties(
                    session_expiry_s=self.session_expiry_s,
                    receive_maximum=min(65535, self.batch_size * 4)),
            )
        except (OSError, ValueError) as e:
            raise TelemetryError(f"cannot reach MQTT broker {s.url}: {e}") from e
        self._client.loop_start()
        if not self._first_connack.wait(connect_timeout_s):
            self._client.loop_stop()
            raise TelemetryError(f"MQTT broker {s.url} did not answer in {connect_timeout_s} s")
        if self._refusal is not None:
            self._client.disconnect()
            self._client.loop_stop()
            raise TelemetryError(
                f"MQTT broker {s.url} refused the collector: {self._refusal}; check the user "
                "in the URL and the password (TOMA_EDGE_MQTT_PASSWORD or --password-file)"
            )
        if not self._subscribed.wait(connect_timeout_s):
            self._client.disconnect()
            self._client.loop_stop()
            raise TelemetryError(f"MQTT broker {s.url} did not confirm our subscriptions")
        self._writer = threading.Thread(target=self._write_loop, name="toma-edge-collector",
                                        daemon=True)
        self._writer.start()
        log.info("collecting from %s into %s", s.url, self.store.path)
        return self

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until :meth:`stop` (or ``timeout_s`` seconds); True if stopped."""
        return self._stop.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Commit and acknowledge what arrived, then disconnect (the session stays)."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()
        self.store.close()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """Whether the broker session is up now."""
        return self._connected.is_set()

    # -- paho callbacks (paho's thread) --------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            if not self._first_connack.is_set():
                self._refusal = str(reason)
                self._first_connack.set()
            log.warning("MQTT broker refused the collector: %s", reason)
            return
        self._generation += 1
        self._connected.set()
        self._first_connack.set()
        subs = [(subscription(k, fleet=self.fleet, share_group=self.share_group), 1)
                for k in KINDS if k != "status"]
        subs.append((subscription("status", fleet=self.fleet), 1))
        client.subscribe(subs)
        log.info("connected to %s (session present: %s)", self.settings.url,
                 getattr(flags, "session_present", "?"))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        bad = [str(r) for r in reasons if r.is_failure]
        if bad:
            log.error("MQTT broker refused our subscriptions: %s; check the ACL (the "
                      "collector user needs read access to toma-edge/v1/#)", ", ".join(bad))
        self._subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        if self._connected.is_set() and not self._stop.is_set():
            log.warning("lost MQTT broker (%s); reconnecting", reason)
        self._connected.clear()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._queue.put((self._generation, msg.topic, msg.payload, msg.mid, msg.qos))

    # -- writer ---------------------------------------------------------------------------
    def _next_batch(self) -> list[tuple[int, str, bytes, int, int]]:
        try:
            batch = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _write_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                if self._stop.is_set():
                    return
                continue
            self._store_and_ack(batch)

    def _store_and_ack(self, batch: list[tuple[int, str, bytes, int, int]]) -> None:
        now = time.time()
        records: list[Record] = []
        rejects: dict[tuple[str, str], list[Any]] = {}
        for _gen, topic, payload, _mid, _qos in batch:
            try:
                fleet, dev, kind = parse_topic(topic)
            except TelemetryError as e:
                self._reject("?", "?", str(e), rejects)
                continue
            if kind == "status" and not payload:  # a cleared retained status
                continue
            try:
                msg = decode(kind, payload, max_bytes=self.max_payload_bytes)
            except TelemetryError as e:
                self._reject(fleet, dev, str(e), rejects)
                continue
            records.append(Record(fleet, dev, msg, now))
        while True:
            try:
                res = self.store.write_batch(
                    records, [(f, d, n, err) for (f, d), (n, err) in rejects.items()])
                break
            except Exception as e:  # locked for too long, disk full: keep unacked, retry
                log.error("fleet database %s: %s; retrying (nothing acknowledged)",
                          self.store.path, e)
                if self._stop.wait(1.0):
                    return  # unacknowledged: the broker redelivers after our restart
        gen = self._generation
        for g, _topic, _payload, mid, qos in batch:
            # a mid from an older connection may name another message now: the broker
            # redelivers that one on our persistent session, and we store it once
            if qos > 0 and g == gen:
                self._client.ack(mid, qos)
        self.stats.received += len(batch)
        self.stats.stored += res.stored
        self.stats.duplicates += res.duplicates
        self.stats.batches += 1
        if self._on_batch is not None:
            self._on_batch(res.stored, res.duplicates)

    def _reject(self, fleet: str, dev: str, err: str,
                rejects: dict[tuple[str, str], list[Any]]) -> None:
        self.stats.rejected += 1
        entry = rejects.setdefault((fleet, dev), [0, err])
        entry[0] += 1
        entry[1] = err
        if (fleet, dev) not in self._logged:  # once per device: a broken device can't flood
            self._logged.add((fleet, dev))
            log.warning("dropping bad message from %s/%s: %s (logged once per device)",
                        fleet, dev, err)
