"""The shipped mosquitto config: ACL per device, no anonymous clients, TLS with an openssl CA,
and the fleet CLI: collect errors, status table, report PNGs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from mqtt_fixtures import Broker, wait_until

from toma_edge.cli import main
from toma_edge.device.agent import TelemetryAgent
from toma_edge.errors import TelemetryError
from toma_edge.host.fleet.collector import Collector
from toma_edge.telemetry import PASSWORD_ENV, TelemetryMessage, make_client, topic

pytestmark = pytest.mark.slow


def _connect(broker: Broker, user: str | None, **kw: Any) -> tuple[Any, dict[str, Any]]:
    seen: dict[str, Any] = {}
    c = make_client(broker.settings(user, **kw), client_id=f"sec-{user}-{time.monotonic_ns()}")
    c.on_connect = lambda cl, u, f, rc, p: seen.setdefault("connack", rc)
    c.on_publish = lambda cl, u, mid, rc, p: seen.setdefault(f"puback{mid}", rc)
    c.on_message = lambda cl, u, m: seen.setdefault("messages", []).append(m.topic)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    wait_until(lambda: "connack" in seen, 5, "CONNACK")
    return c, seen


def test_device_cannot_publish_into_another_device(mqtt_broker: Broker) -> None:
    watcher, seen_w = _connect(mqtt_broker, "collector")
    watcher.subscribe("toma-edge/v1/acl/#", qos=1)
    time.sleep(0.3)
    dev1, seen = _connect(mqtt_broker, "dev-1")
    payload = TelemetryMessage(seq=1, ts=time.time(), window_s=1).encode()
    forged = dev1.publish(topic("acl", "dev-2", "telemetry"), payload, qos=1)
    forged.wait_for_publish(5)
    own = dev1.publish(topic("acl", "dev-1", "telemetry"), payload, qos=1)
    own.wait_for_publish(5)
    wait_until(lambda: "messages" in seen_w, 5, "the device's own message")
    time.sleep(0.3)
    assert seen[f"puback{forged.mid}"].getName() == "Not authorized"
    assert seen_w["messages"] == ["toma-edge/v1/acl/dev-1/telemetry"]
    for c in (dev1, watcher):
        c.disconnect()
        c.loop_stop()


def test_no_credentials_or_wrong_password_cannot_connect(mqtt_broker: Broker,
                                                         tmp_path: Path) -> None:
    c, seen = _connect(mqtt_broker, None)
    assert seen["connack"].is_failure and "authori" in str(seen["connack"]).lower()
    c.loop_stop()
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    with pytest.raises(TelemetryError, match="refused the collector") as ei:
        Collector(mqtt_broker.settings("collector", password_file=pw),
                  db=tmp_path / "f.db").start()
    assert "wrong" not in str(ei.value)
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    r = subprocess.run([sys.executable, "-c", "from toma_edge.cli import main; main()", "fleet",
                        "collect", "--mqtt", mqtt_broker.url("collector"), "--db",
                        str(tmp_path / "g.db")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: MQTT broker")


def test_tls_with_a_ca_made_by_openssl(mqtt_broker: Broker, tmp_path: Path) -> None:
    pki = mqtt_broker.pki
    with Collector(mqtt_broker.settings("collector", tls=True), db=tmp_path / "f.db",
                   share_group="g-tls", session_expiry_s=0) as col:
        agent = TelemetryAgent(
            mqtt_broker.settings("dev-1", tls=True, cert_file=pki["client.crt"],
                                 key_file=pki["client.key"]),
            fleet="tls", device_id="dev-1", spool=tmp_path / "s.db", interval_s=None)
        agent.emit_telemetry()
        assert agent.flush(10)
        agent.close()
        wait_until(lambda: col.store.seqs("tls", "dev-1") == [1], 10, "the TLS message")
    with pytest.raises(TelemetryError, match="refused|reach|answer|certificate"):
        Collector(mqtt_broker.settings("collector", tls=True, ca_file=pki["other-ca.crt"]),
                  db=tmp_path / "g.db", session_expiry_s=0).start(connect_timeout_s=5)


def test_fleet_status_and_report(mqtt_broker: Broker, tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    with Collector(mqtt_broker.settings("collector"), db=db, share_group="g-cli",
                   session_expiry_s=0) as col:
        agents = []
        for i in (4, 5):
            a = TelemetryAgent(mqtt_broker.settings(f"dev-{i}"), fleet="cli",
                               device_id=f"dev-{i}", spool=tmp_path / f"s{i}.db",
                               interval_s=None, budget_bytes=512 << 20, target="rpi4")
            a.set_model("seed-regression", "2026.11.24-1", "ab" * 32)
            for _w in range(4):
                for k in range(20):
                    a.record_request(0.001 * (k + 1), rows=4, error=(k == 0 and i == 5))
                a.emit_telemetry()
            assert a.flush(10)
            agents.append(a)
        agents[1].close()  # dev-5 says goodbye: offline
        wait_until(lambda: col.store.count("telemetry") >= 8 and any(
            d.online is False for d in col.store.devices() if d.fleet == "cli"), 10, "rows")
        runner = CliRunner()
        r = runner.invoke(main, ["fleet", "status", "--db", str(db)])
        assert r.exit_code == 0, r.output
        lines = {ln.split("│")[2].strip(): ln for ln in r.output.splitlines()
                 if "│ cli" in ln}
        assert "online" in lines["dev-4"] and "offline" in lines["dev-5"]
        assert "seed-regression 2026.11.24-1" in lines["dev-4"]
        assert "20.0 ms" in lines["dev-4"]            # p99 of 1..20 ms
        assert "5.00%" in lines["dev-5"] and "0.00%" in lines["dev-4"]
        out = tmp_path / "report"
        r = runner.invoke(main, ["fleet", "report", "--db", str(db), "--out", str(out)])
        assert r.exit_code == 0, r.output
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert "cli__dev-4__latency.png" in pngs and "cli__dev-5__memory.png" in pngs
        assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
        summary = (out / "README.md").read_text()
        assert "| cli | dev-5 | offline |" in summary and "model_loaded" in summary
        agents[0].close()
    r = CliRunner().invoke(main, ["fleet", "report", "--db", str(tmp_path / "none.db")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(main, ["fleet", "collect", "--mqtt", "mqtt://u:secret@h"])
    assert r.exit_code == 2 and "contains a password" in r.output and "secret" not in r.output
