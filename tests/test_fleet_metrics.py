"""Prometheus metrics of the fleet: the exporter over a real store, and a real Prometheus
(Debian's /usr/bin/prometheus) scraping `toma-edge fleet collect --metrics` while a real
device publishes through a real broker."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from mqtt_fixtures import Broker, free_port, start_device, wait_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from toma_edge.cli import main
from toma_edge.host.fleet.metrics_exporter import FleetMetrics, parse_host_port
from toma_edge.host.fleet.store import Record, open_store
from toma_edge.telemetry import (
    PASSWORD_ENV,
    StatusMessage,
    TelemetryMessage,
    connect_properties,
    make_client,
    topic,
)

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = "/usr/bin/prometheus"
GRAFANA = REPO / "docs" / "grafana" / "toma-edge-fleet.json"
HOSTILE = 'm"\\o} {x="1"} <b>'


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _fill(db: Path, n: int) -> None:
    store = open_store(db)
    now = time.time()
    recs = []
    for i in range(n):
        dev = f"pi-{i}"
        recs.append(Record("plant", dev, StatusMessage(
            online=i % 2 == 0, ts=now, model=HOSTILE if i == 0 else "m", model_version="v1",
            budget_bytes=1000), now))
        recs.append(Record("plant", dev, TelemetryMessage(
            seq=1, ts=now, window_s=10, requests=10, errors=i, latency_p99_s=0.01 * (i + 1),
            peak_rss_bytes=600 + i, rss_bytes=500, budget_bytes=1000), now))
    store.write_batch(recs)
    store.close()


def test_exporter_series_per_device_bounded_and_labels_escaped(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    _fill(db, 3)
    store = open_store(db, create=False)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FleetMetrics(store, max_devices=2))
    s = _samples(generate_latest(reg).decode())
    store.close()
    head = {d["device_id"]: v for d, v in s["toma_edge_device_memory_headroom_bytes"]}
    assert head == {"pi-0": 400, "pi-1": 399}              # the cap: 2 of 3 devices
    assert s["toma_edge_exporter_devices_omitted"][0][1] == 3 - 2
    assert s["toma_edge_fleet_devices"] == [({"fleet": "plant"}, 3)]   # totals count all
    assert s["toma_edge_fleet_devices_online"] == [({"fleet": "plant"}, 2)]
    assert {d["device_id"]: v for d, v in s["toma_edge_device_online"]} == {"pi-0": 1, "pi-1": 0}
    assert {d["device_id"]: v for d, v in s["toma_edge_device_error_ratio"]} == {
        "pi-0": 0.0, "pi-1": 0.1}
    info = {d["device_id"]: d for d, _ in s["toma_edge_device_model_info"]}
    assert info["pi-0"]["model"] == HOSTILE and info["pi-0"]["version"] == "v1"
    # labels fleet and device_id only on per-device series: model lives in the info metric
    for name, rows in s.items():
        if name.startswith("toma_edge_device_") and name != "toma_edge_device_model_info":
            assert all(set(labels) == {"fleet", "device_id"} for labels, _ in rows), name
    with pytest.raises(Exception, match="must be HOST:PORT"):
        parse_host_port("9464", option="--metrics")


def test_collect_metrics_bad_address_or_port_in_use(tmp_path: Path) -> None:
    env = {PASSWORD_ENV: "x"}
    runner = CliRunner()
    base = ["fleet", "collect", "--mqtt", "mqtt://collector@127.0.0.1:9", "--db",
            str(tmp_path / "f.db")]
    for bad in ("nope", "127.0.0.1:0", "127.0.0.1:70000", ":9464"):
        r = runner.invoke(main, [*base, "--metrics", bad], env=env)
        assert r.exit_code == 2, (bad, r.output)
        assert r.output.strip().splitlines() == [
            f"error: --metrics {bad!r} must be HOST:PORT, like 127.0.0.1:9464"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = runner.invoke(main, [*base, "--metrics", f"127.0.0.1:{port}"], env=env)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"cannot listen on 127.0.0.1:{port} for --metrics" in r.output
    assert len(r.output.strip().splitlines()) == 1


def _prom_query(port: int, expr: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _grafana_exprs() -> list[str]:
    dash = json.loads(GRAFANA.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_prometheus_scrapes_device_headroom_from_the_collector(mqtt_broker: Broker,
                                                               tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    mport, pport = free_port(), free_port()
    log = tmp_path / "collector.log"
    with open(log, "ab") as out:
        col = subprocess.Popen(
            [sys.executable, "-m", "toma_edge.cli", "fleet", "collect", "--mqtt",
             mqtt_broker.url("collector"), "--db", str(db), "--client-id", "metrics-col",
             "--metrics", f"127.0.0.1:{mport}"],
            env=mqtt_broker.env("collector"), stdout=out, stderr=out)
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: toma-edge-collector\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n")
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{pport}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "ab"))  # noqa: SIM115
    try:
        wait_until(lambda: "collecting from" in log.read_text() or col.poll() is not None,
                   30, "the collector")
        assert col.poll() is None, log.read_text()
        dev = start_device(mqtt_broker, device_id="dev-7", spool=tmp_path / "s7.db",
                           count=5, rate_hz=20, fleet="prom")
        assert dev.wait(60) == 0
        # a device sends garbage: the collector counts it as rejected (and acks it)
        bad = make_client(mqtt_broker.settings("dev-8"), client_id="dev-8-garbage")
        bad.connect("127.0.0.1", mqtt_broker.port, properties=connect_properties())
        bad.loop_start()
        bad.publish(topic("prom", "dev-8", "telemetry"), b"{not json", qos=1).wait_for_publish(10)
        bad.disconnect()
        bad.loop_stop()

        reader = open_store(db, create=False)
        wait_until(lambda: reader.seqs("prom", "dev-7") == [1, 2, 3, 4, 5], 20, "5 windows")
        last = reader.telemetry("prom", "dev-7")[-1]
        reader.close()
        assert last["budget_bytes"] == 256 << 20 and last["peak_rss_bytes"] > 0
        want = last["budget_bytes"] - last["peak_rss_bytes"]

        expr = 'toma_edge_device_memory_headroom_bytes{fleet="prom",device_id="dev-7"}'
        got: list[Any] = []

        def scraped() -> bool:
            try:
                got[:] = _prom_query(pport, expr)["data"]["result"]
            except OSError:
                return False
            return bool(got) and float(got[0]["value"][1]) == want
        wait_until(scraped, 30, f"Prometheus to have {expr} == {want} (got {got})")
        assert got[0]["metric"]["job"] == "toma-edge-collector" and len(got) == 1

        def value(e: str) -> float | None:
            res = _prom_query(pport, e)["data"]["result"]
            return float(res[0]["value"][1]) if res else None
        wait_until(lambda: value("toma_edge_collector_messages_rejected_total") == 1.0,
                   20, "the rejected message in Prometheus")
        assert (value("toma_edge_collector_messages_stored_total") or 0) >= 5
        info = _prom_query(pport, 'toma_edge_device_model_info{device_id="dev-7"}')
        labels = info["data"]["result"][0]["metric"]
        assert (labels["model"], labels["version"]) == ("seed-regression", "2026.11.24-1")
        assert value('toma_edge_device_online{device_id="dev-7"}') == 0.0   # said goodbye

        # every query of the Grafana dashboard runs on this Prometheus, on metrics we export
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            exported = {n.removesuffix("_total") for n in _samples(r.read().decode())}
        for e in _grafana_exprs():
            names = set(re.findall(r"\btoma_edge_[a-z0-9_]+", e))
            assert names and all(n.removesuffix("_total") in exported for n in names), e
            res = _prom_query(pport, e.replace("$fleet", ".*")
                              .replace("$__rate_interval", "1m"))
            assert res["status"] == "success", (e, res)
    finally:
        prom.terminate()
        col.terminate()
        prom.wait(20)
        col.wait(20)
    assert col.returncode == 0, log.read_text()[-2000:]
    assert "stopped:" in log.read_text()


def test_grafana_dashboard_is_valid_json_with_the_panels() -> None:
    dash = json.loads(GRAFANA.read_text())
    titles = {p["title"] for p in dash["panels"]}
    assert {"Memory headroom per device", "p99 latency per device", "Error rate per device",
            "Online", "Collector throughput (messages/s)", "Collector lag and queue"} <= titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert os.path.getsize(GRAFANA) < 64 * 1024
