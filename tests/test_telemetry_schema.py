"""Telemetry schema, MQTT URL/settings, the spool and the request window (no broker)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from toma_edge.device.agent import RequestWindow, TelemetryAgent, read_cpu_temp_c
from toma_edge.device.spool import Spool
from toma_edge.errors import ConfigError, TelemetryError
from toma_edge.telemetry import (
    PASSWORD_ENV,
    EventMessage,
    StatusMessage,
    TelemetryMessage,
    decode,
    mqtt_settings,
    parse_mqtt_url,
    parse_topic,
    subscription,
    topic,
    validate_id,
)


def test_topics_and_ids() -> None:
    assert topic("plant-7", "pi-0042", "telemetry") == "toma-edge/v1/plant-7/pi-0042/telemetry"
    assert parse_topic("toma-edge/v1/plant-7/pi-0042/events") == ("plant-7", "pi-0042", "events")
    assert subscription("telemetry", share_group="g") == "$share/g/toma-edge/v1/+/+/telemetry"
    for bad in ["a/b", "+", "#", "dev#1", "$SYS", "", "with space", "x" * 65]:
        with pytest.raises(ConfigError, match="not valid"):
            validate_id(bad)
    for bad_topic in ["toma-edge/v1/f/d", "toma-edge/v2/f/d/status", "toma-edge/v1/f/d/other",
                      "toma-edge/v1/f/+/status"]:
        with pytest.raises(TelemetryError):
            parse_topic(bad_topic)


def test_messages_round_trip_and_refuse_bad_payloads() -> None:
    t = TelemetryMessage(seq=7, ts=1.7e9, window_s=10.0, requests=3, latency_p99_s=0.02,
                         rss_bytes=100, peak_rss_bytes=120, budget_bytes=1 << 28)
    assert decode("telemetry", t.encode()) == t
    e = EventMessage(seq=1, ts=1.0, kind="model_loaded", fields={"model": "m", "n": 3})
    assert decode("events", e.encode()) == e
    s = StatusMessage(online=True, ts=1.0, model="m")
    assert decode("status", s.encode()) == s
    with pytest.raises(ValidationError):  # frozen
        t.seq = 8  # type: ignore[misc]
    good = json.loads(t.encode())
    cases = {
        b"not json": "not JSON",
        b"[1, 2]": "JSON object",
        json.dumps({**good, "v": 2}).encode(): "schema version 2",
        json.dumps({**good, "extra": 1}).encode(): "extra",
        json.dumps({**good, "seq": 0}).encode(): "seq",
        json.dumps({**good, "requests": "many"}).encode(): "requests",
        b"{" + b" " * 70_000 + b"}": "over",
    }
    for payload, needle in cases.items():
        with pytest.raises(TelemetryError, match=needle) as ei:
            decode("telemetry", payload)
        assert "\n" not in str(ei.value)


def test_mqtt_urls_and_passwords(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    u = parse_mqtt_url("mqtts://pi-1@broker.lan")
    assert (u.host, u.port, u.tls, u.username) == ("broker.lan", 8883, True, "pi-1")
    assert parse_mqtt_url("mqtt://h:1884").port == 1884
    for bad, needle in [("http://h", "mqtt://"), ("mqtt://u:secret@h", "contains a password"),
                        ("mqtt://", "no host"), ("mqtt://h:70000", "malformed"),
                        ("mqtt://h/x", "path")]:
        with pytest.raises(ConfigError, match=needle) as ei:
            parse_mqtt_url(bad)
        assert "secret" not in str(ei.value)
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    s = mqtt_settings("mqtt://u@h")
    assert s.password == "from-env" and "from-env" not in repr(s)
    pf = tmp_path / "pw"
    pf.write_text("from-file\n")
    assert mqtt_settings("mqtt://u@h", password_file=pf).password == "from-file"
    with pytest.raises(ConfigError, match="no user"):
        mqtt_settings("mqtt://h")
    with pytest.raises(ConfigError, match="does not exist"):
        mqtt_settings("mqtt://u@h", password_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match="mqtts://"):
        mqtt_settings("mqtt://u@h", ca_file=pf)


def test_spool_seq_survives_reopen_and_drops_oldest_telemetry(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db", max_messages=5)
    assert [sp.put("telemetry", "t", lambda s: b"%d" % s) for _ in range(3)] == [1, 2, 3]
    assert sp.put("events", "e", lambda s: b"e%d" % s) == 1
    sp.close()
    sp = Spool(tmp_path / "s.db", max_messages=5)
    assert sp.last_seq("telemetry") == 3 and sp.last_seq("events") == 1
    for _ in range(4):
        sp.put("telemetry", "t", lambda s: b"%d" % s)
    rows = sp.peek(limit=10)
    assert len(rows) == 5 and sp.dropped("telemetry") == 3 and sp.dropped("events") == 0
    assert b"e1" in [r.payload for r in rows]  # events outlive older telemetry
    assert [r.payload for r in rows if r.kind == "telemetry"] == [b"4", b"5", b"6", b"7"]
    sp.delete([r.id for r in rows[:2]])
    assert sp.pending() == 3
    with pytest.raises(ValueError):  # a failing builder takes no seq
        sp.put("telemetry", "t", lambda s: (_ for _ in ()).throw(ValueError("boom")))
    assert sp.last_seq("telemetry") == 7


def _hammer(path: str) -> None:
    sp = Spool(path)
    while True:
        sp.put("telemetry", "t", lambda s: b"%d" % s)


def test_spool_sigkill_loses_no_seq(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    p = multiprocessing.get_context("spawn").Process(target=_hammer, args=(path,))
    p.start()
    time.sleep(1.0)
    assert p.pid is not None
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    sp = Spool(path)
    payloads = [int(r.payload) for r in sp.peek(limit=1_000_000)]
    assert payloads == list(range(1, sp.last_seq("telemetry") + 1)) and len(payloads) > 10


def test_request_window_stats() -> None:
    w = RequestWindow()
    for i in range(1, 101):
        w.record(i / 1000, rows=2, error=(i % 10 == 0))
    s = w.snapshot()
    assert s["requests"] == 100 and s["errors"] == 10 and s["rows"] == 200
    assert s["latency_p50_s"] == pytest.approx(0.050)
    assert s["latency_p99_s"] == pytest.approx(0.099)
    assert s["latency_max_s"] == pytest.approx(0.100)
    assert w.snapshot()["requests"] == 0  # a new window


def test_agent_offline_spools_everything(tmp_path: Path) -> None:
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("48312\n")
    assert read_cpu_temp_c(str(tmp_path / "thermal")) == pytest.approx(48.312)
    assert read_cpu_temp_c(str(tmp_path / "none")) is None
    a = TelemetryAgent(None, fleet="f", device_id="d", spool=tmp_path / "s.db", interval_s=None,
                       budget_bytes=1 << 28)
    a.set_model("m", "1", "ab" * 32)
    a.set_batch_size(16)
    a.set_batch_size(8)
    a.record_request(0.01, rows=16)
    assert a.emit_telemetry() == 1
    with pytest.raises(TelemetryError, match="event 'Bad Kind'"):
        a.event("Bad Kind")
    rows = a.spool.peek(limit=10)
    kinds = [(r.topic.rsplit("/", 1)[1], json.loads(r.payload)) for r in rows]
    assert [k for k, _ in kinds] == ["events", "events", "telemetry"]
    assert kinds[1][1]["kind"] == "budget_adapted"
    tel = kinds[2][1]
    assert tel["requests"] == 1 and tel["batch_size"] == 8 and tel["model"] == "m"
    assert tel["rss_bytes"] > 0 and tel["peak_rss_bytes"] >= tel["rss_bytes"]
    assert tel["budget_bytes"] == 1 << 28
    a.close()


def test_device_side_does_not_import_host() -> None:
    code = ("import toma_edge.device.agent, toma_edge.device.spool, sys; "
            "assert 'toma_edge.host' not in sys.modules, 'host imported'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spool_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(TelemetryError, match="cannot be opened") as ei:
        Spool(tmp_path / "file" / "s.db")
    assert "\n" not in str(ei.value)
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not sqlite" * 100)
    with pytest.raises(TelemetryError):
        Spool(bad)


def test_fleet_status_p99_comes_from_the_last_window_that_served(tmp_path: Path) -> None:
    from toma_edge.host.fleet.store import FleetStore, Record

    store = FleetStore(tmp_path / "f.db")
    t0 = time.time()
    busy = TelemetryMessage(seq=1, ts=t0, window_s=1.0, requests=50,
                            latency_p50_s=0.001, latency_p95_s=0.002, latency_p99_s=0.004,
                            latency_max_s=0.005)
    idle = TelemetryMessage(seq=2, ts=t0 + 1, window_s=1.0, requests=0)
    store.write_batch([Record("f", "d", busy, t0), Record("f", "d", idle, t0 + 1)])
    (row,) = store.devices()
    assert row.latency_p99_s == 0.004  # not the idle last window's "no latency"
    assert row.requests == 50
    store.close()


def test_decode_is_strict_about_types_versions_and_sizes() -> None:
    """Issue 12, class 2: nothing is converted; a payload without "v" is refused."""
    good = json.loads(TelemetryMessage(seq=3, ts=1.7e9, window_s=10.0, requests=2).encode())
    no_v = {k: v for k, v in good.items() if k != "v"}
    ev = json.loads(EventMessage(seq=1, ts=1.0, kind="error", fields={"n": 1}).encode())
    st = json.loads(StatusMessage(online=True, ts=1.0).encode())
    cases: list[tuple[str, bytes, str]] = [
        ("telemetry", json.dumps({**good, "seq": "3"}).encode(), "seq"),
        ("telemetry", json.dumps({**good, "seq": 4.0}).encode(), "seq"),
        ("telemetry", json.dumps({**good, "seq": True}).encode(), "seq"),
        ("telemetry", json.dumps({**good, "seq": 2**63}).encode(), "64-bit"),
        ("telemetry", json.dumps({**good, "rss_bytes": 2**64}).encode(), "rss_bytes|64-bit"),
        ("telemetry", json.dumps({**good, "ts": "1.7e9"}).encode(), "ts"),
        ("telemetry", json.dumps({**good, "requests": 2.0}).encode(), "requests"),
        ("telemetry", json.dumps({**good, "model": "m" * 300}).encode(), "model"),
        ("telemetry", json.dumps({**good, "model": "a\u0000b"}).encode(), "model"),
        ("telemetry", json.dumps({**good, "v": True}).encode(), "schema version"),
        ("telemetry", json.dumps({**good, "v": 1.0}).encode(), "schema version"),
        ("telemetry", json.dumps(no_v).encode(), "no schema version"),
        ("telemetry", b'{"v": 1, "seq": 1, "ts": 1, "window_s": 1e999}', "not JSON"),
        ("telemetry", b'{"v": 1, "seq": 1, "ts": NaN, "window_s": 1}', "not JSON"),
        ("telemetry", b"", "empty"),
        ("telemetry", b'{"v": 1, "seq": 1, "ts": 1, "window_s": 1, "model": "\xff"}', "UTF-8"),
        ("telemetry", b"[" * 10_000 + b"]" * 10_000, "depth|deep"),
        ("status", json.dumps({**st, "online": "yes"}).encode(), "online"),
        ("status", json.dumps({**st, "online": 1}).encode(), "online"),
        ("events", json.dumps({**ev, "fields": {"n": [1]}}).encode(), "'n'"),
        ("events", json.dumps({**ev, "fields": {"n": {"a": 1}}}).encode(), "'n'"),
        ("events", json.dumps({**ev, "fields": {"n": "x\u0000"}}).encode(), "NUL"),
        ("events", json.dumps({**ev, "fields": {"n": "x" * 5000}}).encode(), "4096"),
        ("events", json.dumps({**ev, "fields": {f"k{i}": i for i in range(65)}}).encode(),
         "fields"),
    ]
    for kind, payload, needle in cases:
        with pytest.raises(TelemetryError, match=needle) as ei:
            decode(kind, payload)
        assert "\n" not in str(ei.value) and len(str(ei.value)) < 400, str(ei.value)
    # what the strict schema still takes: ints for floats, JSON scalars in event fields
    assert decode("telemetry", json.dumps({**good, "ts": 1700000000}).encode()).ts == 1.7e9
    e = decode("events", json.dumps({**ev, "fields": {"a": None, "b": True, "c": 2**62,
                                                      "d": 0.5, "e": "line\nbreak"}}).encode())
    assert isinstance(e, EventMessage) and e.fields["b"] is True and e.fields["c"] == 2**62
