"""Delivery against a real mosquitto with real device and collector processes: nothing lost
across broker restarts, collector and device kills; duplicates stored once; shared
subscriptions split the load; malformed payloads dead-lettered (kept raw with their
reason in ``rejects``), counted and acknowledged."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import Broker, start_collector, start_device, wait_until

from toma_edge.device.agent import TelemetryAgent
from toma_edge.host.fleet.collector import Collector
from toma_edge.telemetry import TelemetryMessage, make_client, topic

pytestmark = pytest.mark.slow


def _seqs(db: Path, device: str, fleet: str = "test") -> list[int]:
    if not db.exists():
        return []
    con = sqlite3.connect(str(db), timeout=10)
    try:
        return [r[0] for r in con.execute(
            "SELECT seq FROM telemetry WHERE fleet = ? AND device_id = ? ORDER BY seq",
            (fleet, device))]
    except sqlite3.OperationalError:  # the collector has not created the tables yet
        return []
    finally:
        con.close()


def _raw_client(broker: Broker, user: str) -> Any:
    c = make_client(broker.settings(user), client_id=f"raw-{user}-{time.monotonic_ns()}")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def test_agent_spools_and_delivers(mqtt_broker: Broker, tmp_path: Path) -> None:
    got: list[bool] = []
    with Collector(mqtt_broker.settings("collector"), db=tmp_path / "f.db",
                   share_group="g-deliver", session_expiry_s=0) as col:
        agent = TelemetryAgent(mqtt_broker.settings("dev-1"), fleet="deliver",
                               device_id="dev-1", spool=tmp_path / "spool.db", interval_s=0.1,
                               budget_bytes=64 << 20, on_connection_change=got.append)
        agent.set_model("m", "1")
        for _ in range(20):
            agent.record_request(0.005, rows=1)
        wait_until(lambda: agent.spool.last_seq("telemetry") >= 5, 10, "five windows")
        agent.close()
        wait_until(lambda: col.store.count("telemetry") >= 5 and
                   any(d.online is False for d in col.store.devices()), 10, "rows and goodbye")
        seqs = col.store.seqs("deliver", "dev-1")
        assert len(seqs) >= 5 and seqs == list(range(1, len(seqs) + 1))
        assert col.store.seqs("deliver", "dev-1", table="events") == [1]
        assert got[0] is True
        # the spool is empty once everything was acknowledged
        from toma_edge.device.spool import Spool
        assert Spool(tmp_path / "spool.db").pending() == 0


def test_nothing_lost_across_broker_collector_and_device_kills(
        broker_factory: Any, tmp_path: Path) -> None:
    n = 300
    broker: Broker = broker_factory()
    db, spool, logs = tmp_path / "fleet.db", tmp_path / "spool.db", tmp_path / "logs"
    logs.mkdir()
    col = start_collector(broker, db=db, client_id="col-a", log=logs / "col1.log")
    dev = start_device(broker, device_id="dev-1", spool=spool, count=n, rate_hz=60,
                       log=logs / "dev.log")
    try:
        stored = lambda: len(_seqs(db, "dev-1"))  # noqa: E731
        wait_until(lambda: stored() >= 30, 30, "30 rows")
        broker.stop(signal.SIGTERM)                       # outage 1
        time.sleep(0.7)
        broker.start()
        wait_until(lambda: stored() >= 90, 40, "90 rows")
        col.send_signal(signal.SIGKILL)                   # collector killed...
        col.wait()
        time.sleep(1.0)
        col = start_collector(broker, db=db, client_id="col-a", log=logs / "col2.log")
        wait_until(lambda: stored() >= 150, 40, "150 rows")
        dev.send_signal(signal.SIGKILL)                   # device killed...
        dev.wait()
        dev = start_device(broker, device_id="dev-1", spool=spool, count=n, rate_hz=60,
                           log=logs / "dev.log")
        wait_until(lambda: stored() >= 200, 40, "200 rows")
        broker.stop(signal.SIGTERM)                       # outage 2
        time.sleep(0.7)
        broker.start()
        assert dev.wait(timeout=90) == 0, (logs / "dev.log").read_text()[-2000:]
        wait_until(lambda: stored() >= n, 30, f"{n} rows")
        time.sleep(0.5)
        seqs = _seqs(db, "dev-1")
        assert len(seqs) == n and seqs == list(range(1, n + 1))  # no gap, no duplicate
    finally:
        for p in (dev, col):
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)


def test_duplicates_stored_once(mqtt_broker: Broker, tmp_path: Path) -> None:
    with Collector(mqtt_broker.settings("collector"), db=tmp_path / "f.db",
                   share_group="g-dup", session_expiry_s=0) as col:
        raw = _raw_client(mqtt_broker, "dev-2")
        t = topic("dup", "dev-2", "telemetry")
        msgs = [TelemetryMessage(seq=s, ts=time.time(), window_s=1.0).encode()
                for s in (1, 2, 2, 3, 1, 3)]
        for m in msgs:
            raw.publish(t, m, qos=1).wait_for_publish(5)
        wait_until(lambda: col.stats.stored + col.stats.duplicates >= 6, 10, "six messages")
        raw.disconnect()
        raw.loop_stop()
        assert col.store.seqs("dup", "dev-2") == [1, 2, 3]
        assert (col.stats.stored, col.stats.duplicates) == (3, 3)


def test_two_collectors_split_a_shared_subscription(broker_factory: Any, tmp_path: Path) -> None:
    n = 240
    broker: Broker = broker_factory()
    db = tmp_path / "fleet.db"
    cols = [start_collector(broker, db=db, client_id=f"col-{i}", log=tmp_path / f"c{i}.log",
                            share_group="toma-edge-collectors")
            for i in range(2)]
    devs = [start_device(broker, device_id=f"dev-{i}", spool=tmp_path / f"s{i}.db", count=n // 2,
                         rate_hz=0, log=tmp_path / f"d{i}.log") for i in range(2)]
    for d in devs:
        assert d.wait(timeout=60) == 0
    wait_until(lambda: sum(len(_seqs(db, f"dev-{i}")) for i in range(2)) >= n, 20, "all rows")
    time.sleep(0.5)
    stats = []
    for i, c in enumerate(cols):
        c.send_signal(signal.SIGTERM)
        assert c.wait(timeout=20) == 0
        line = [ln for ln in (tmp_path / f"c{i}.log").read_text().splitlines()
                if ln.startswith("stopped:")][-1]
        # "stopped: R received, S stored, D duplicates, J rejected"
        stats.append([int(w) for w in line.replace(",", "").split() if w.isdigit()])
    stored = [s[1] for s in stats]
    dups = [s[2] for s in stats]
    # each device also has one model_loaded event: n telemetry + 2 events in all
    assert sum(stored) == n + 2 and all(x > 0 for x in stored), stats
    assert dups == [0, 0], stats
    for i in range(2):
        assert _seqs(db, f"dev-{i}") == list(range(1, n // 2 + 1))


def test_malformed_payloads_counted_logged_once_and_dropped(
        mqtt_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="toma_edge.fleet")
    with Collector(mqtt_broker.settings("collector"), db=tmp_path / "f.db",
                   share_group="g-bad", session_expiry_s=0) as col:
        raw = _raw_client(mqtt_broker, "dev-3")
        t = topic("bad", "dev-3", "telemetry")
        good = json.loads(TelemetryMessage(seq=1, ts=time.time(), window_s=1.0).encode())
        for payload in [b"\xff\xfe garbage", b"[]", json.dumps({**good, "v": 9}).encode(),
                        json.dumps({**good, "rss_bytes": -5}).encode(),
                        json.dumps({**good, "pad": "x" * 100_000}).encode(),
                        json.dumps(good).encode()]:
            raw.publish(t, payload, qos=1).wait_for_publish(5)
        raw.publish(topic("bad", "dev-3", "events"), b"{}", qos=1).wait_for_publish(5)
        wait_until(lambda: col.stats.rejected >= 6 and col.stats.stored >= 1, 10, "all seven")
        raw.disconnect()
        raw.loop_stop()
        assert col.stats.rejected == 6 and col.store.seqs("bad", "dev-3") == [1]
        dev = [d for d in col.store.devices() if d.device_id == "dev-3"][0]
        assert dev.rejected == 6
        # dead letters: each kept raw (bounded by the collector's payload limit) with a reason
        letters = col.store.rejects()
        assert len(letters) == 6 and col.stats.queued == 0
        assert letters[-1]["payload"] == b"\xff\xfe garbage"
        assert all(len(r["payload"]) <= col.max_payload_bytes and r["reason"] for r in letters)
        logged = [r for r in caplog.records if "dev-3" in r.getMessage()]
        assert len(logged) == 1 and "\n" not in logged[0].getMessage()
