"""Hostile MQTT against one real `toma-edge serve` on the real mosquitto (shipped config, ACL).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_hostile_mqtt.py
    python -m pytest -q tests/test_hostile_mqtt.py --hypothesis-profile=long   # deeper

Requests are sent over a raw MQTT v5 socket (:class:`RawPublisher`), so anything the broker
forwards can be tried: malformed JSON, deep nesting, huge integers, response topics and
``reply_to`` values MQTT refuses, oversized correlation data, U+FEFF in properties. The
device must answer an error where a valid response topic exists, else count the request
as unanswerable; it never loses its connection (its Last Will would say offline), never
stops taking requests, and answers a valid request correctly afterwards. Also: another
user naming the device's or a collector's client id takes nothing over (class 10), SIGTERM
stops `serve` within 2 s with no collector subscribed and the spooled telemetry leaves on
the next start (class 12), /healthz says "degraded" while the broker is away.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import sqlite3
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_fixtures import SHIPPED, Broker, password_for, wait_until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_service_http import ServiceProc, offline

from toma_edge.telemetry import connect_properties, make_client

FLEET, DEV = "hostile", "dev-9"
BASE = f"toma-edge/v1/{FLEET}/{DEV}"
REQUEST = f"{BASE}/infer/request"
PREFIX = f"{BASE}/infer/response/"
MINE = PREFIX + "client-app"  # what client-app may read


# -- a raw MQTT v5 publisher: sends exactly the bytes a test wants ---------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = divmod(n, 128)
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s16(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def prop_response_topic(t: bytes) -> bytes:
    return b"\x08" + _s16(t)


def prop_correlation(c: bytes) -> bytes:
    return b"\x09" + _s16(c)


def prop_user(k: bytes, v: bytes) -> bytes:
    return b"\x26" + _s16(k) + _s16(v)


class RawPublisher:
    """One MQTT v5 connection of ``user`` that publishes one QoS 1 message and returns
    the PUBACK reason code, or None when the broker closed the connection instead
    (it refuses malformed UTF-8, NUL, oversized packets)."""

    def __init__(self, broker: Broker, user: str) -> None:
        self.port, self.user = broker.port, user

    def publish(self, topic: bytes, payload: bytes, props: bytes = b"") -> int | None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            vh = _s16(b"MQTT") + bytes([5, 0xC2]) + struct.pack("!H", 30) + b"\x00"
            body = vh + _s16(b"raw") + _s16(self.user.encode()) + _s16(
                password_for(self.user).encode())
            s.sendall(b"\x10" + _varint(len(body)) + body)
            kind, ack = self._read(s)
            assert kind >> 4 == 2 and ack[1] == 0, ack
            vh = _s16(topic) + struct.pack("!H", 1) + _varint(len(props)) + props
            s.sendall(b"\x32" + _varint(len(vh) + len(payload)) + vh + payload)
            try:
                kind, ack = self._read(s)
            except (ConnectionError, OSError):
                return None
            s.sendall(b"\xe0\x00")  # DISCONNECT
            return ack[2] if len(ack) > 2 else 0

    @staticmethod
    def _read(s: socket.socket) -> tuple[int, bytes]:
        head = s.recv(1)
        if not head:
            raise ConnectionError("closed by the broker")
        n, mult = 0, 1
        while True:
            b = s.recv(1)
            if not b:
                raise ConnectionError("closed by the broker")
            n += (b[0] & 127) * mult
            mult *= 128
            if not b[0] & 128:
                break
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            if not chunk:
                raise ConnectionError("closed by the broker")
            body += chunk
        return head[0], body


def _client(broker: Broker, user: str, client_id: str = "ignored") -> tuple[Any, queue.Queue[Any]]:
    got: queue.Queue[Any] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password_for(user))
    c.on_message = lambda cl, ud, msg: got.put(msg)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c, got


def _stop(*clients: Any) -> None:
    for c in clients:
        c.disconnect()
        c.loop_stop()


class Device:
    """The served device under attack, a client that reads its answers, a watcher of its
    status (a Last Will saying offline means the broker lost the device)."""

    def __init__(self, broker: Broker, bundle: Path, folder: Path) -> None:
        env = broker.env(DEV)
        env["OMP_NUM_THREADS"] = "1"
        self.broker, self.bundle = broker, bundle
        self.svc = ServiceProc(folder / "serve.log", env=env, args=[
            str(bundle), "--mqtt", broker.url(DEV), "--fleet", FLEET, "--device-id", DEV,
            "--telemetry-interval", "60", "--spool", str(folder / "spool.db"),
            "--threads", "1"])
        self.app, self.answers = _client(broker, "client-app")
        self.app.subscribe(MINE + "/#", qos=1)
        self.watch, self.status = _client(broker, "collector-3")
        self.watch.subscribe(f"{BASE}/status", qos=1)
        self.raw = RawPublisher(broker, "client-app-2")
        self.rows = np.random.default_rng(12).normal(size=(2, 10)).astype(np.float32)
        self.want = offline(bundle, self.rows)
        self.n = 0
        wait_until(lambda: self.svc.health()["mqtt"]["taking_requests"], 30, "taking requests")
        time.sleep(0.3)

    def ask(self, payload: bytes, topic: str, corr: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = topic
        props.CorrelationData = corr
        self.app.publish(REQUEST, payload, qos=1, properties=props).wait_for_publish(10)

    def answers_until(self, corr: bytes | None, timeout_s: float = 15) -> dict[bytes | None, Any]:
        """Answers read until the one carrying ``corr`` (by correlation data; None: none)."""
        out: dict[bytes | None, Any] = {}
        deadline = time.monotonic() + timeout_s
        while corr not in out:
            msg = self.answers.get(timeout=max(0.1, deadline - time.monotonic()))
            c = getattr(msg.properties, "CorrelationData", None)
            out[c] = (msg.topic, json.loads(msg.payload))
        return out

    def check_valid(self) -> dict[bytes | None, Any]:
        """A valid request is answered correctly; returns every answer read meanwhile."""
        self.n += 1
        corr = f"probe-{self.n}-{uuid.uuid4().hex}".encode()
        self.ask(json.dumps({"inputs": self.rows.tolist()}).encode(), MINE + "/probe", corr)
        got = self.answers_until(corr)
        topic, ans = got[corr]
        assert topic == MINE + "/probe", topic
        np.testing.assert_allclose(np.asarray(ans["outputs"]), self.want, atol=1e-5)
        return got

    def check_healthy(self) -> dict[str, Any]:
        h = self.svc.health()
        m, t = h["mqtt"], h["telemetry"]
        assert h["status"] == "ok" and m["taking_requests"] and m["network_thread_alive"], h
        assert m["callback_errors"] == 0 and t["callback_errors"] == 0, h
        assert t["connects"] == 1, f"the device reconnected: {h}"
        offline_seen = []
        while not self.status.empty():
            offline_seen += [m for m in [self.status.get()] if not json.loads(m.payload)["online"]]
        assert not offline_seen, "the broker published the device's Last Will (offline)"
        assert "Traceback" not in self.svc.tail()
        return h

    def close(self) -> None:
        _stop(self.app, self.watch)
        assert self.svc.stop(signal.SIGTERM) == 0, self.svc.tail()


@pytest.fixture(scope="module")
def device(mqtt_broker: Broker, example_bundle: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    d = Device(mqtt_broker, example_bundle, tmp_path_factory.mktemp("hostile-mqtt"))
    yield d
    d.close()


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


DEEP = b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
BIG_INT = b'{"inputs": [[' + b"9" * 400 + b", 0, 0, 0, 0, 0, 0, 0, 0, 0]]}"
ROW = [0.5] * 10


def test_hostile_requests_are_refused_and_the_device_keeps_answering(device: Device) -> None:
    """Classes 1 and 4: each answerable request gets a 4xx error on its topic, each other
    one is counted unanswerable; no disconnect, no dead thread; valid requests answered."""
    device.check_valid()
    before = device.check_healthy()["mqtt"]
    # (payload, v5 response topic or None, correlation): answered with a 4xx error
    answerable = {
        b"deep": (DEEP, 400),
        b"bigint": (BIG_INT, 400),
        b"badutf8": (b'{"inputs": [["\xff\xfe"]]}', 400),
        b"surrogate-in-json": (b'{"inputs": [[1]], "x": "\\ud800"}', 400),
        b"array": (b"[1, 2, 3]", 400),
        b"id-object": (_j({"inputs": [ROW], "id": {"a": 1}}), 400),
        b"id-long": (_j({"inputs": [ROW], "id": "x" * 5000}), 400),
        b"id-bool": (_j({"inputs": [ROW], "id": True}), 400),
        b"strings": (_j({"inputs": [["0.1"] * 10]}), 422),
    }
    for corr, (payload, _status) in answerable.items():
        device.ask(payload, MINE + "/bad", corr)
    got = device.answers_until(b"strings")
    for corr, (_, status) in answerable.items():
        topic, ans = got[corr]
        assert topic == MINE + "/bad" and ans["status"] == status and ans["error"], (corr, ans)
        assert "id" not in ans
    # correlation data over the bound: answered without it (on its own topic)
    device.ask(_j({"inputs": [ROW]}), MINE + "/long-corr", b"c" * 5000)
    got = device.answers_until(None)
    assert got[None][0] == MINE + "/long-corr" and got[None][1]["status"] == 400

    # v3.1.1 style reply_to values no answer may go to
    bad_reply_to: list[Any] = [
        PREFIX + "client-app/\ud800", PREFIX + "client-app/a\x00b", PREFIX + "client-app/+",
        PREFIX + "client-app/#", PREFIX + "client-app/" + "x" * 70_000, 42, None, [MINE],
        PREFIX + "client-app/\x01", PREFIX + "client-app/\ufffe", PREFIX + "client-app/\ufeff",
        f"{BASE}/status", f"toma-edge/v1/{FLEET}/dev-8/infer/response/client-app", PREFIX,
        "$SYS/x", "",
    ]
    for r in bad_reply_to:
        device.raw.publish(REQUEST.encode(), _j({"inputs": [ROW], "reply_to": r}))
    # v5 Response Topics MQTT allows that are not ours, and ones the device must not use
    bad_v5 = [PREFIX.encode() + b"client-app/+", PREFIX.encode() + b"client-app/#",
              PREFIX.encode() + "client-app/\ufeff".encode(), f"{BASE}/status".encode(),
              PREFIX.encode()]
    for t in bad_v5:
        acked = device.raw.publish(REQUEST.encode(), _j({"inputs": [ROW]}),
                                   prop_response_topic(t) + prop_correlation(b"v5"))
        assert acked == 0, t
    # no response topic at all; a 10,000-deep request with neither
    device.raw.publish(REQUEST.encode(), _j({"inputs": [ROW]}))
    device.raw.publish(REQUEST.encode(), DEEP)
    # U+FEFF in a user property of a valid request: paho would drop the connection on it
    assert device.raw.publish(
        REQUEST.encode(), _j({"inputs": device.rows.tolist()}),
        prop_response_topic(MINE.encode() + b"/feff") + prop_correlation(b"feff")
        + prop_user(b"k", "\ufeff".encode())) == 0
    got = device.check_valid()
    np.testing.assert_allclose(np.asarray(got[b"feff"][1]["outputs"]), device.want, atol=1e-5)
    assert b"v5" not in got, "answered on a response topic it must not use"
    after = device.check_healthy()["mqtt"]
    n_unanswerable = len(bad_reply_to) + len(bad_v5) + 2
    assert after["unanswerable"] - before["unanswerable"] == n_unanswerable, (before, after)
    assert after["answered"] - before["answered"] == len(answerable) + 1 + 1 + 1, (before, after)
    log = device.svc.tail()
    assert len(re.findall("names no response topic", log)) <= 2, "one log line per request"


def test_takeover_by_client_id_is_refused(device: Device, mqtt_broker: Broker) -> None:
    """Class 10: another user naming the device's client ids does not kick it off."""
    device.check_valid()
    thieves = [_client(mqtt_broker, "client-app-2", client_id=cid)[0] for cid in (
        f"toma-edge-{FLEET}-{DEV}-infer", f"toma-edge-{FLEET}-{DEV}", DEV)]
    try:
        time.sleep(1.0)
        for i in range(3):
            device.check_valid()
            time.sleep(0.2 * i)
        device.check_healthy()
    finally:
        _stop(*thieves)


def test_collector_session_cannot_be_stolen(mqtt_broker: Broker, tmp_path: Path) -> None:
    """Class 10: a client naming a collector's client id with clean start off gets
    neither its session nor its queued telemetry; the collector gets all of it."""
    from toma_edge.device.agent import TelemetryAgent

    sub = "toma-edge/v1/steal/+/telemetry"

    def collector(user: str, client_id: str) -> tuple[Any, queue.Queue[Any]]:
        got: queue.Queue[Any] = queue.Queue()
        c = make_client(mqtt_broker.settings(user), client_id=client_id)
        c.on_message = lambda cl, ud, msg: got.put(msg)
        c.connect("127.0.0.1", mqtt_broker.port, clean_start=False,
                  properties=connect_properties(session_expiry_s=600))
        c.loop_start()
        return c, got

    def drop_sessions() -> None:
        # clean start ends a user's own persistent session (an earlier test's collector
        # may have left one subscribed to every fleet: that would be its own, not stolen)
        for user in ("collector-2", "collector", "client-app-2"):
            clean = make_client(mqtt_broker.settings(user), client_id="x")
            clean.connect("127.0.0.1", mqtt_broker.port, clean_start=True)
            clean.loop_start()
            time.sleep(0.3)
            _stop(clean)

    drop_sessions()
    col, _ = collector("collector-2", "col-steal")
    col.subscribe(sub, qos=1)
    time.sleep(0.5)
    _stop(col)
    agent = TelemetryAgent(mqtt_broker.settings("dev-10"), fleet="steal", device_id="dev-10",
                           spool=tmp_path / "s.db", interval_s=None)
    for _ in range(5):
        agent.emit_telemetry()
    assert agent.flush(10)
    agent.close()
    # (client-app is the reader of the module's device: one connection per user)
    thieves = [("client-app-2", "col-steal"), ("client-app-2", "collector-2"),
               ("collector", "col-steal"), ("collector", "collector-2")]
    try:
        for user, cid in thieves:
            thief, loot = collector(user, cid)
            time.sleep(1.0)
            _stop(thief)
            stolen = [m.topic for m in list(loot.queue) if m.topic.startswith("toma-edge/v1/steal/")]
            assert not stolen, f"{user} naming client id {cid!r} got the collector's {stolen}"
        col, got = collector("collector-2", "col-steal")
        seqs: list[int] = []
        try:
            while len(seqs) < 5:
                seqs.append(json.loads(got.get(timeout=10).payload)["seq"])
        finally:
            _stop(col)
    finally:
        drop_sessions()
    assert sorted(seqs) == [1, 2, 3, 4, 5]


def test_every_shipped_listener_binds_client_ids_to_usernames() -> None:
    """mosquitto 2.0 reads use_username_as_clientid per listener: one without it is a hole."""
    blocks = re.split(r"^listener ", (SHIPPED / "mosquitto.conf").read_text(), flags=re.M)[1:]
    assert len(blocks) == 2
    for b in blocks:
        assert re.search(r"^use_username_as_clientid true$", b, flags=re.M), b


def _spooled_seqs(spool: Path) -> list[int]:
    with sqlite3.connect(spool) as db:
        rows = db.execute("SELECT payload FROM outbox WHERE kind = 'telemetry'").fetchall()
    return sorted(json.loads(r[0])["seq"] for r in rows)


def test_sigterm_stops_within_2s_without_collector_and_spool_leaves_next_start(
        broker_factory: Any, example_bundle: Path, tmp_path: Path) -> None:
    """Class 12: no collector subscribed; SIGTERM to exit < 2 s; unacknowledged telemetry
    stays spooled and is published after the restart."""
    broker = broker_factory()
    dev = "dev-11"
    env = broker.env(dev)
    env["OMP_NUM_THREADS"] = "1"
    spool = tmp_path / "spool.db"
    args = [str(example_bundle), "--mqtt", broker.url(dev), "--fleet", "stop", "--device-id",
            dev, "--telemetry-interval", "0.3", "--spool", str(spool), "--threads", "1"]
    svc = ServiceProc(tmp_path / "serve1.log", env=env, args=args)
    try:
        wait_until(lambda: svc.health()["telemetry"]["spooled"] >= 3, 20, "telemetry spooled")
        time.sleep(0.5)  # the agent has been told "no matching subscribers" by now
        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        rc = svc.proc.wait(30)
        took = time.monotonic() - t0
    finally:
        svc.stop(signal.SIGKILL)
    assert rc == 0, svc.tail()
    assert took < 2.0, f"serve took {took:.2f} s to stop after SIGTERM"
    left = _spooled_seqs(spool)
    assert len(left) >= 3, left
    watch, got = _client(broker, "collector")
    watch.subscribe(f"toma-edge/v1/stop/{dev}/telemetry", qos=1)
    time.sleep(0.3)
    svc = ServiceProc(tmp_path / "serve2.log", env=env, args=args)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 20
        while not set(left) <= seen:
            assert time.monotonic() < deadline, (left, sorted(seen))
            try:
                seen.add(json.loads(got.get(timeout=1).payload)["seq"])
            except queue.Empty:
                pass
        assert svc.stop(signal.SIGTERM) == 0
    finally:
        svc.stop(signal.SIGKILL)
        _stop(watch)
    print(f"stop took {took:.3f} s; {len(left)} spooled rows delivered after the restart")


def test_healthz_degraded_while_the_broker_is_away(broker_factory: Any, example_bundle: Path,
                                                   tmp_path: Path) -> None:
    """/healthz reports a front end that takes no requests; back to ok after reconnecting."""
    broker = broker_factory()
    dev = "dev-10"
    env = broker.env(dev)
    env["OMP_NUM_THREADS"] = "1"
    svc = ServiceProc(tmp_path / "serve.log", env=env, args=[
        str(example_bundle), "--mqtt", broker.url(dev), "--fleet", "away", "--device-id", dev,
        "--spool", str(tmp_path / "spool.db"), "--threads", "1"])
    try:
        wait_until(lambda: svc.health()["status"] == "ok", 20, "status ok")
        broker.stop()
        wait_until(lambda: svc.health()["status"] == "degraded", 10, "status degraded")
        h = svc.health()
        assert h["mqtt"]["taking_requests"] is False and h["mqtt"]["connected"] is False, h
        broker.start()
        wait_until(lambda: svc.health()["status"] == "ok", 30, "status ok again")
        assert svc.health()["mqtt"]["taking_requests"] is True
    finally:
        assert svc.stop(signal.SIGTERM) == 0, svc.tail()


# -- property: whatever a client sends, the device keeps answering --------------------------
_texts = st.text(max_size=40)
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                       _texts)
_json = st.recursive(_json_leaf, lambda c: st.one_of(
    st.lists(c, max_size=5), st.dictionaries(_texts, c, max_size=5)), max_leaves=30)
_topics = st.one_of(
    _texts, st.builds(lambda s: MINE + "/" + s, _texts), st.builds(lambda s: PREFIX + s, _texts),
    st.builds(lambda n: MINE + "/" + "y" * n, st.integers(60_000, 70_000)))
_reply_to = st.one_of(_topics, _json)
_ids = st.one_of(_json, st.text(min_size=200, max_size=400),
                 st.integers(min_value=-(10**30), max_value=10**30))


@st.composite
def _payloads(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["json", "object", "deep", "bigint", "bytes", "request"]))
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    if kind == "deep":
        n = draw(st.integers(1, 20_000))
        return b'{"inputs": ' + b"[" * n + b"]" * n + b"}"
    if kind == "bigint":
        return b'{"inputs": [[' + b"1" * draw(st.integers(18, 600)) + b"]]}"
    if kind == "bytes":
        return bytes(draw(st.binary(max_size=300)))
    obj: dict[str, Any] = {}
    if kind == "request" or draw(st.booleans()):
        obj["inputs"] = draw(st.one_of(_json, st.lists(st.lists(
            st.floats(width=32, allow_nan=False), min_size=10, max_size=10), max_size=3)))
    if draw(st.booleans()):
        obj["reply_to"] = draw(_reply_to)
    if draw(st.booleans()):
        obj["id"] = draw(_ids)
    if draw(st.booleans()):
        obj[draw(_texts)] = draw(_json)
    return json.dumps(obj).encode()  # lone surrogates become "\ud800" escapes


@st.composite
def _props(draw: Any) -> bytes:
    out = b""
    topic = draw(st.one_of(st.none(), _topics))
    if topic is not None:  # surrogates as raw bytes: malformed UTF-8 the broker refuses
        out += prop_response_topic(topic.encode("utf-8", "surrogatepass")[:65_535])
    corr = draw(st.one_of(st.none(), st.binary(max_size=3000)))
    if corr is not None:
        out += prop_correlation(corr)
    for k, v in draw(st.lists(st.tuples(_texts, _texts), max_size=2)):
        out += prop_user(k.encode("utf-8", "surrogatepass"), v.encode("utf-8", "surrogatepass"))
    return out


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])
@given(payload=_payloads(), props=_props())
def test_property_hostile_requests_never_stop_the_device(device: Device, payload: bytes,
                                                         props: bytes) -> None:
    """Whatever arrives: no dead thread, no disconnect, each request answered (4xx or a
    correct answer) or counted unanswerable, and a valid request is answered afterwards."""
    before = device.svc.health()["mqtt"]
    acked = device.raw.publish(REQUEST.encode(), payload, props)
    got = device.check_valid()
    for corr, (_topic, ans) in got.items():
        if corr is not None and corr.startswith(b"probe-"):
            continue
        assert "outputs" in ans or 400 <= ans["status"] < 500, ans
    after = device.check_healthy()["mqtt"]
    handled = (after["answered"] + after["unanswerable"]
               - before["answered"] - before["unanswerable"])
    # the probe, plus the hostile request unless the broker refused it (malformed UTF-8)
    assert handled == (2 if acked is not None else 1), (acked, before, after)
