"""`toma-edge serve --mqtt` against a real mosquitto (the shipped fleet config and ACL):
MQTT v5 requests answered on the Response Topic with their Correlation Data, v3.1.1
requests via reply_to/id, errors as error replies, response topics outside the device's
tree ignored, telemetry and status published, SIGTERM exits 0 with the status offline."""

from __future__ import annotations

import json
import queue
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from mqtt_fixtures import Broker, password_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_service_http import ServiceProc, offline

FLEET, DEV = "test", "dev-7"
BASE = f"toma-edge/v1/{FLEET}/{DEV}"


def _client(broker: Broker, user: str, *, v5: bool = True) -> tuple[Any, queue.Queue[Any]]:
    got: queue.Queue[Any] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.monotonic_ns()}",
                    protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    c.username_pw_set(user, password_for(user))
    c.on_message = lambda cl, ud, msg: got.put(msg)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c, got


def test_mqtt_requests_answers_errors_and_telemetry(
        mqtt_broker: Broker, example_bundle: Path, tmp_path: Path) -> None:
    env = mqtt_broker.env(DEV)
    env["OMP_NUM_THREADS"] = "1"
    watch, seen = _client(mqtt_broker, "collector")
    watch.subscribe(f"{BASE}/#", qos=1)
    svc = ServiceProc(tmp_path / "serve.log", env=env, args=[
        str(example_bundle), "--mqtt", mqtt_broker.url(DEV), "--fleet", FLEET,
        "--device-id", DEV, "--telemetry-interval", "1", "--spool", str(tmp_path / "spool.db"),
        "--threads", "1"])
    app, answers = _client(mqtt_broker, "client-app")
    # one connection per user (the broker makes the username the client id)
    old, v3answers = _client(mqtt_broker, "client-app-2", v5=False)
    try:
        resp = f"{BASE}/infer/response/client-app"
        app.subscribe(resp + "/#", qos=1)
        resp3 = f"{BASE}/infer/response/client-app-2/v3"
        old.subscribe(resp3, qos=1)
        deadline = time.monotonic() + 20
        while "taking inference requests" not in svc.tail():
            assert time.monotonic() < deadline, svc.tail()
            time.sleep(0.1)
        time.sleep(0.3)

        rng = np.random.default_rng(3)
        rows = rng.normal(size=(3, 10)).astype(np.float32)

        def ask(payload: bytes, corr: bytes, topic: str = resp + "/v5") -> None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = topic
            props.CorrelationData = corr
            app.publish(f"{BASE}/infer/request", payload, qos=1, properties=props)

        ask(json.dumps({"inputs": rows.tolist()}).encode(), b"req-1")
        ask(b'{"inputs": [[1, 2]]}', b"req-2")
        ask(b"{not json", b"req-3")
        # a response topic outside the device's response tree: never answered
        ask(json.dumps({"inputs": rows.tolist()}).encode(), b"req-4", topic=f"{BASE}/status")
        old.publish(f"{BASE}/infer/request", json.dumps(
            {"inputs": rows[:1].tolist(), "reply_to": resp3, "id": 42}).encode(), qos=1)

        by_corr: dict[bytes, dict[str, Any]] = {}
        while len(by_corr) < 3:
            msg = answers.get(timeout=20)
            assert msg.topic == resp + "/v5", msg.topic
            by_corr[msg.properties.CorrelationData] = json.loads(msg.payload)
        want = offline(example_bundle, rows)
        np.testing.assert_allclose(np.array(by_corr[b"req-1"]["outputs"]), want, atol=1e-5)
        assert by_corr[b"req-2"]["status"] == 422 and "shape [10]" in by_corr[b"req-2"]["error"]
        assert by_corr[b"req-3"]["status"] == 400 and "invalid JSON" in by_corr[b"req-3"]["error"]
        v3 = json.loads(v3answers.get(timeout=20).payload)
        assert v3["id"] == 42
        np.testing.assert_allclose(np.array(v3["outputs"]), want[:1], atol=1e-5)
        time.sleep(0.5)
        assert answers.empty(), f"unexpected answer on {answers.get().topic}"
        assert "names no response topic" in svc.tail()

        # telemetry windows count the requests; status names the model
        tele: list[dict[str, Any]] = []
        status: list[dict[str, Any]] = []
        deadline = time.monotonic() + 15
        while not any(t.get("requests", 0) >= 3 for t in tele):
            assert time.monotonic() < deadline, (tele, status)
            try:
                msg = seen.get(timeout=1)
            except queue.Empty:
                continue
            if msg.topic.endswith("/telemetry"):
                tele.append(json.loads(msg.payload))
            elif msg.topic.endswith("/status"):
                status.append(json.loads(msg.payload))
        assert any(s["online"] and s["model"] == "seed-regression" for s in status), status
        h = svc.health()
        assert h["mqtt"]["connected"] is True and h["mqtt"]["taking_requests"] is True
        assert h["mqtt"]["shared_connection"] is True and h["status"] == "ok", h
        assert h["mqtt"]["unanswerable"] == 1 and h["mqtt"]["callback_errors"] == 0, h
        assert svc.stop(signal.SIGTERM) == 0, svc.tail()
        deadline = time.monotonic() + 10
        offline_seen = False
        while not offline_seen and time.monotonic() < deadline:
            try:
                msg = seen.get(timeout=1)
            except queue.Empty:
                continue
            if msg.topic.endswith("/status") and not json.loads(msg.payload)["online"]:
                offline_seen = True
        assert offline_seen, "no offline status after SIGTERM"
    finally:
        svc.stop(signal.SIGKILL)
        for c in (watch, app, old):
            c.loop_stop()
            c.disconnect()


def test_serve_over_tls_with_a_password_file(
        mqtt_broker: Broker, example_bundle: Path, tmp_path: Path) -> None:
    from toma_edge.telemetry import PASSWORD_ENV

    dev = "dev-8"
    base = f"toma-edge/v1/{FLEET}/{dev}"
    pw = tmp_path / "mqtt-password"
    pw.write_text(password_for(dev) + "\n")
    env = mqtt_broker.env(dev)
    env.pop(PASSWORD_ENV, None)  # only the file gives the password
    env["OMP_NUM_THREADS"] = "1"
    svc = ServiceProc(tmp_path / "serve.log", env=env, args=[
        str(example_bundle), "--http", "off", "--mqtt", mqtt_broker.url(dev, tls=True),
        "--ca-file", str(mqtt_broker.ca_file), "--password-file", str(pw), "--fleet", FLEET,
        "--device-id", dev, "--spool", str(tmp_path / "spool.db"), "--threads", "1"])
    app, answers = _client(mqtt_broker, "client-app")
    try:
        resp = f"{base}/infer/response/client-app/tls"
        app.subscribe(resp, qos=1)
        deadline = time.monotonic() + 20
        while "taking inference requests" not in svc.tail():
            assert time.monotonic() < deadline, svc.tail()
            time.sleep(0.1)
        time.sleep(0.3)
        rows = np.random.default_rng(8).random((2, 10)).astype(np.float32)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = resp
        props.CorrelationData = b"tls-1"
        app.publish(f"{base}/infer/request", json.dumps({"inputs": rows.tolist()}).encode(),
                    qos=1, properties=props)
        msg = answers.get(timeout=20)
        assert msg.properties.CorrelationData == b"tls-1"
        got = np.asarray(json.loads(msg.payload)["outputs"], dtype=np.float32)
        np.testing.assert_allclose(got, offline(example_bundle, rows), atol=1e-5)
    finally:
        app.loop_stop()
        app.disconnect()
        svc.stop()
