"""The fleet collector: stores every device's status, telemetry and events exactly once.

    from toma_edge.telemetry import mqtt_settings
    from toma_edge.host.fleet.collector import Collector
    with Collector(mqtt_settings("mqtt://collector@localhost"), db="fleet.db") as c:
        c.wait(60)                                 # store for a minute, then stop
    print(c.stats.stored, c.stats.duplicates, c.stats.rejected, c.stats.dead_lettered)

Delivery (docs/architecture.md, "Telemetry (MQTT)"): a persistent MQTT v5 session (clean start off,
a session expiry), paho's manual acknowledgement, and a PUBACK sent only after the
batch holding the message is committed to the store (``open_store``: a SQLite path or a
``postgresql://`` URL); so a message the broker accepted survives a collector crash (the
broker redelivers it) and a message delivered twice is stored once (insert-or-ignore on
``(fleet, device_id, seq)``). ``status`` is subscribed plainly (shared subscriptions get
no retained messages); telemetry and events optionally through a shared subscription.

No message can block the collector (issue 12): a payload that fails the strict schema
(:func:`toma_edge.telemetry.decode`) and a record the database refuses for its data are
both dead letters: stored raw with their reason in the ``rejects`` table, counted
(``rejected``: decoding, ``dead_lettered``: database) and acknowledged, so the broker
never redelivers them. Only :class:`~.store.StoreUnavailable` (locked, disk full,
connection lost) is retried, with exponential backoff from ``retry_min_s`` to
``retry_max_s``, nothing acknowledged meanwhile, logged once per outage; :meth:`stop`
interrupts the backoff (the unacknowledged messages come again after a restart).
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
from typing import Any, NamedTuple

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
from .store import BatchResult, Record, Reject, StoreUnavailable, open_store

__all__ = ["Collector", "CollectorStats", "BatchHook", "SHARE_GROUP"]

log = logging.getLogger("toma_edge.fleet")

SHARE_GROUP = "toma-edge-collectors"
_MAX_TOPIC_CHARS = 512      # of a topic kept in a dead letter
_MAX_LOGGED_DEVICES = 10_000  # devices remembered for "logged once per device"

BatchHook = Callable[[int, int], None]
"""Called after each committed batch with ``(stored, duplicates)``."""


@dataclass
class CollectorStats:
    """Counters since the collector started (messages; ``last_commit_at``: unix seconds).

    ``received`` counts arrivals (a redelivery counts again); ``stored`` and
    ``duplicates`` telemetry/event rows new or already stored; ``rejected`` payloads that
    failed decoding and ``dead_lettered`` records the database refused (both kept in the
    ``rejects`` table and acknowledged); ``retries`` commits retried while the store was
    unavailable; ``queued`` messages received and not yet committed (nor acknowledged).
    """

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    retries: int = 0
    batches: int = 0
    queued: int = 0
    last_commit_at: float | None = None


class _Msg(NamedTuple):
    generation: int
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float


class Collector:
    """Subscribes, stores in batches, acknowledges after commit; see the module docstring.

    ``db`` is a SQLite path (or ``sqlite:///path``) or a ``postgresql://user@host:port/db``
    URL. ``batch_size`` messages (or what arrived within ``batch_wait_s`` seconds) are
    committed in one transaction. ``session_expiry_s`` is how long the broker keeps our
    session (and queues messages for it) while we are away. Several collectors with the
    same ``share_group`` (e.g. :data:`SHARE_GROUP`) split telemetry and events through an
    MQTT v5 shared subscription; give each its own user (the shipped broker config makes
    the username the client id; ``client_id`` defaults to the username). Without one the
    subscription is plain: mosquitto 2.0.11 (Debian 12) does not restore shared
    subscriptions, nor the messages queued for them, when a persisting broker restarts,
    so a single collector subscribes plainly and loses nothing across broker restarts.
    A store that is unavailable is retried after ``retry_min_s`` seconds, doubling up to
    ``retry_max_s`` seconds. ``store``: an already opened store to use instead of ``db``
    (e.g. a SQLite store with a short busy timeout); the collector closes it on stop.
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
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        on_batch: BatchHook | None = None,
        store: Any = None,
    ) -> None:
        if batch_size < 1:
            raise TelemetryError(f"batch size must be >= 1, got {batch_size}")
        if not 0 < retry_min_s <= retry_max_s:
            raise TelemetryError(
                f"retry delays must be 0 < min <= max, got {retry_min_s} and {retry_max_s} s")
        self.settings = settings
        self.store = store if store is not None else open_store(db)
        # default: the username, which the shipped broker config makes the client id anyway
        # (use_username_as_clientid), so a restart resumes the same persistent session
        self.client_id = (client_id or settings.url.username
                          or f"toma-edge-collector-{socket.gethostname()}-{os.getpid()}")
        self.fleet = fleet
        self.share_group = share_group
        self.session_expiry_s = session_expiry_s
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.max_payload_bytes = max_payload_bytes
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.stats = CollectorStats()
        self._stats_lock = threading.Lock()  # paho's thread and the writer both count
        self._on_batch = on_batch
        self._queue: queue.Queue[_Msg] = queue.Queue()
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
        log.info("collecting from %s into %s", s.url, self.store.path_or_url)
        return self

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until :meth:`stop` (or ``timeout_s`` seconds); True if stopped."""
        return self._stop.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Commit and acknowledge what arrived, then disconnect (the session stays). A
        store that is unavailable is not waited for: what it did not commit stays
        unacknowledged, and the broker delivers it again after a restart."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()
        if self._writer is not None and self._writer.is_alive():
            log.warning("the fleet store did not answer within %.0f s; leaving it open", timeout_s)
            return
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
        try:  # nothing may escape into paho's network thread
            m = _Msg(self._generation, msg.topic, bytes(msg.payload), msg.mid, msg.qos,
                     time.time())
        except Exception as e:  # e.g. a topic that is not UTF-8: paho raises on .topic
            log.warning("dropping an unreadable MQTT message: %s", e)
            m = _Msg(self._generation, "?", b"", msg.mid, msg.qos, time.time())
        with self._stats_lock:
            self.stats.received += 1
            self.stats.queued += 1
        self._queue.put(m)

    # -- writer ---------------------------------------------------------------------------
    def _next_batch(self) -> list[_Msg]:
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
            try:
                committed = self._store_and_ack(batch)
            except Exception:  # a bug must not kill the writer: nothing acked, say so once
                log.exception("collector writer failed on a batch of %d; not acknowledged",
                              len(batch))
                committed = not self._stop.wait(self.retry_min_s)
            if not committed:
                return  # stopped while the store was unavailable

    def _decode(self, batch: list[_Msg]) -> tuple[list[Record], list[Reject]]:
        records: list[Record] = []
        letters: list[Reject] = []
        for m in batch:
            try:
                fleet, dev, kind = parse_topic(m.topic)
            except TelemetryError as e:
                letters.append(self._letter("?", "?", m, str(e)))
                continue
            if kind == "status" and not m.payload:  # a cleared retained status
                continue
            try:
                msg = decode(kind, m.payload, max_bytes=self.max_payload_bytes)
            except TelemetryError as e:
                letters.append(self._letter(fleet, dev, m, str(e)))
                continue
            records.append(Record(fleet, dev, msg, m.received_at, topic=m.topic,
                                  payload=m.payload))
        return records, letters

    def _store_and_ack(self, batch: list[_Msg]) -> bool:
        """Decode, commit (retrying only an unavailable store), then acknowledge ``batch``;
        False when stopped before the commit (nothing acknowledged)."""
        records, letters = self._decode(batch)
        res = self._write(records, letters)
        if res is None:
            return False
        gen = self._generation
        for m in batch:
            # a mid from an older connection may name another message now: the broker
            # redelivers that one on our persistent session, and we store it once
            if m.qos > 0 and m.generation == gen:
                self._client.ack(m.mid, m.qos)
        with self._stats_lock:
            self.stats.queued -= len(batch)
            self.stats.stored += res.stored
            self.stats.duplicates += res.duplicates
            self.stats.rejected += len(letters)
            self.stats.dead_lettered += res.dead_lettered
            self.stats.batches += 1
            self.stats.last_commit_at = time.time()
        if self._on_batch is not None:
            try:
                self._on_batch(res.stored, res.duplicates)
            except Exception:
                log.exception("the collector's on_batch hook failed (ignored)")
        return True

    def _write(self, records: list[Record], letters: list[Reject]) -> BatchResult | None:
        """Commit one batch; retries while the store is unavailable (backoff), None if
        stopped meanwhile. A failure outside the store's contract is isolated record by
        record, so one record can never block the rest."""
        delay, outage = self.retry_min_s, None
        while True:
            try:
                try:
                    res = self.store.write_batch(records, letters)
                except StoreUnavailable:
                    raise
                except Exception as e:  # not the store's contract: never retry it forever
                    log.error("fleet store %s failed on a batch (%s); storing its messages "
                              "one by one", self.store.path_or_url, e)
                    res = self._write_one_by_one(records, letters)
            except StoreUnavailable as e:
                if outage is None:
                    outage = time.monotonic()
                    log.error("%s; retrying with backoff up to %.0f s, nothing acknowledged "
                              "meanwhile (logged once per outage)", e, self.retry_max_s)
                with self._stats_lock:
                    self.stats.retries += 1
                if self._stop.wait(delay):
                    return None  # unacknowledged: the broker redelivers after our restart
                delay = min(delay * 2, self.retry_max_s)
                continue
            if outage is not None:
                log.warning("fleet store %s takes writes again after %.1f s",
                            self.store.path_or_url, time.monotonic() - outage)
            return res

    def _write_one_by_one(self, records: list[Record], letters: list[Reject]) -> BatchResult:
        stored = duplicates = dead = 0
        for r in records:
            try:
                one = self.store.write_batch([r])
            except StoreUnavailable:
                raise  # the whole batch again later: insert-or-ignore keeps it exactly once
            except Exception as e:
                letters = [*letters, Reject(r.fleet, r.device_id, r.topic, r.payload,
                                            f"fleet store failed on this record: {e}"[:500],
                                            r.received_at)]
                dead += 1
                continue
            stored += one.stored
            duplicates += one.duplicates
            dead += one.dead_lettered
        try:
            self.store.write_batch([], letters)
        except StoreUnavailable:
            raise
        except Exception as e:  # cannot even keep the letters: count and log, never block
            log.error("fleet store %s cannot keep %d dead letters: %s", self.store.path_or_url,
                      len(letters), e)
        return BatchResult(stored=stored, duplicates=duplicates, dead_lettered=dead)

    def _letter(self, fleet: str, dev: str, m: _Msg, err: str) -> Reject:
        """A dead letter for a message that failed decoding; logged once per device."""
        key = (fleet, dev)
        if key not in self._logged:  # once per device: a broken device can't flood the log
            if len(self._logged) < _MAX_LOGGED_DEVICES:
                self._logged.add(key)
            log.warning("dead-lettering a bad message from %s/%s: %s (logged once per "
                        "device)", fleet, dev, err)
        return Reject(fleet, dev, m.topic[:_MAX_TOPIC_CHARS],
                      m.payload[:self.max_payload_bytes], err, m.received_at)
