"""The live fleet dashboard in a real browser (Playwright driving Debian's Chromium) against
a real `toma-edge fleet dashboard` process over a real store; its CLI's bad input; the
retention command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from mqtt_fixtures import free_port, wait_until

from toma_edge.cli import main
from toma_edge.host.fleet.store import Record, open_store
from toma_edge.telemetry import EventMessage, StatusMessage, TelemetryMessage

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["pg_fixtures"]  # pg_server, pg_url

CHROMIUM = "/usr/bin/chromium"
# the README's picture is rewritten only on request (TOMA_EDGE_UPDATE_SCREENSHOT=1), so a
# test run leaves the tree clean; otherwise the screenshot goes to a temporary folder
_README_SCREENSHOT = REPO / "docs" / "img" / "dashboard.png"
MIB = 1 << 20
EVIL_ID = 'evil"><img src=x onerror="window.__xss=1">'
EVIL_MODEL = "<script>window.__xss=2</script><b>bold</b>"


def _window(seq: int, ts: float, d: int, *, p99: float | None = None) -> TelemetryMessage:
    return TelemetryMessage(
        seq=seq, ts=ts, window_s=10, requests=100, errors=d, latency_p50_s=0.004,
        latency_p95_s=0.008, latency_p99_s=p99 if p99 is not None else 0.012 + 0.002 * d,
        rss_bytes=(150 + 30 * d) * MIB, peak_rss_bytes=(176 + 30 * d) * MIB,
        budget_bytes=256 * MIB, model="seed-regression", model_version="2026.11.24-1")


def _fleet(db: Path, devices: int = 4, windows: int = 60) -> None:
    store = open_store(db)
    now = time.time()
    recs = []
    for d in range(devices):
        dev = f"pi-{d:04d}"
        recs.append(Record("plant-7", dev, StatusMessage(
            online=d != 3, ts=now, model="seed-regression", model_version="2026.11.24-1",
            target="rpi4", budget_bytes=256 * MIB), now))
        recs.append(Record("plant-7", dev, EventMessage(
            seq=1, ts=now - 700, kind="model_loaded", fields={"model": "seed-regression"}), now))
        recs += [Record("plant-7", dev, _window(i, now - 10 * (windows - i), d), now)
                 for i in range(1, windows + 1)]
    store.write_batch(recs)
    store.close()


def _write(db: Path, *recs: Record) -> None:
    store = open_store(db)
    store.write_batch(list(recs))
    store.close()


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A `toma-edge fleet dashboard` process over a store of four devices."""
    db = tmp_path / "fleet.db"
    _fleet(db)
    port = free_port()
    log = tmp_path / "dashboard.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "toma_edge.cli", "fleet", "dashboard", "--db", str(db),
             "--http", f"127.0.0.1:{port}", "--refresh", "0.3"], stdout=out, stderr=out)
    try:
        wait_until(lambda: "dashboard of" in log.read_text() or proc.poll() is not None,
                   30, "the dashboard")
        assert proc.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{port}", db
    finally:
        proc.terminate()
        rc = proc.wait(20)
    assert rc == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()


def _browser(p: Any) -> Any:
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"])


def _watch(page: Any, problems: list[str]) -> None:
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def dialog(d: Any) -> None:  # alert() from injected markup would land here
        problems.append(f"dialog: {d.message}")
        d.dismiss()

    page.on("dialog", dialog)


def _until(page: Any, js: str, timeout_s: float = 10.0) -> None:
    """Poll the expression ``js`` in the page until true (page.evaluate runs outside the
    page's CSP, which forbids the eval that wait_for_function uses)."""
    wait_until(lambda: page.evaluate(js) is True, timeout_s, js)


def _row(page: Any, device: str) -> dict[str, str]:
    return page.evaluate(
        """(dev) => { const tr = [...document.querySelectorAll('#devices tbody tr')]
                        .find(r => r.dataset.device === dev);
                      if (!tr) return null;
                      return Object.fromEntries([...tr.cells].map(c => [c.dataset.label,
                                                                        c.textContent])); }""",
        device)


def test_dashboard_in_a_browser_live_charts_phone_and_hostile_strings(
        dashboard: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, db = dashboard
    problems: list[str] = []
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1000, "height": 430})
        _watch(page, problems)
        page.goto(url + "/")
        _until(page, "document.querySelectorAll('#devices tbody tr').length === 4")
        row = _row(page, "pi-0002")
        assert row["fleet"] == "plant-7" and row["status"] == "online"
        assert row["model"] == "seed-regression 2026.11.24-1"
        assert row["memory"] == "236.0 MiB / 256.0 MiB (92%)"
        assert row["p99"] == "16.0 ms" and row["errors"] == "2.00%"
        assert _row(page, "pi-0003")["status"] == "offline"
        assert page.inner_text("#n-total") == "4" and page.inner_text("#n-online") == "3"
        assert page.inner_text("#live") == "live"

        # a new telemetry window shows up without a reload
        page.evaluate("window.__same_page = true")
        _write(db, Record("plant-7", "pi-0001", _window(61, time.time(), 1, p99=0.5),
                          time.time()))
        _until(page,
            "[...document.querySelectorAll('#devices tbody tr')]"
            ".find(r => r.dataset.device === 'pi-0001').cells[5].textContent === '500.0 ms'")
        assert page.evaluate("window.__same_page") is True
        page.wait_for_timeout(300)
        shot = (_README_SCREENSHOT if os.environ.get("TOMA_EDGE_UPDATE_SCREENSHOT")
                else tmp_path / "dashboard.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size < 200_000

        # hostile strings from a device are shown as text, never run
        _write(db, Record("plant-7", EVIL_ID, StatusMessage(
            online=True, ts=time.time(), model=EVIL_MODEL, model_version="1"), time.time()))
        _until(page, "document.querySelectorAll('#devices tbody tr').length === 5")
        evil = _row(page, EVIL_ID)
        assert evil["device"] == EVIL_ID and evil["model"] == EVIL_MODEL + " 1"
        assert page.evaluate("document.querySelectorAll('#devices img, #devices script, "
                             "#devices b').length") == 0
        assert page.evaluate("window.__xss") is None

        # a device's page: charts, facts, events, live
        page.click("a[href='/device/plant-7/pi-0001']")
        _until(page, "document.querySelectorAll('.uplot canvas').length === 2")
        sizes = page.evaluate("[...document.querySelectorAll('.uplot canvas')]"
                              ".map(c => [c.width, c.height])")
        assert all(w > 200 and h > 100 for w, h in sizes), sizes
        fact = "(k) => document.querySelector(`[data-fact='${k}'] dd`)?.textContent"
        _until(page, f"({fact})('last window') === '#61'")
        assert page.evaluate(fact, "headroom") == "50.0 MiB"
        assert page.evaluate("document.querySelector('#events tbody').textContent"
                             ).count("model_loaded") == 1
        page.evaluate("window.__same_page = true")
        _write(db, Record("plant-7", "pi-0001", _window(62, time.time() + 1, 1, p99=0.25),
                          time.time()))
        _until(page, f"({fact})('last window') === '#62'")
        assert page.evaluate(fact, "p99 latency") == "250.0 ms"
        assert page.evaluate("window.__same_page") is True

        page.goto(url + "/device/plant-7/" + urllib.parse.quote(EVIL_ID, safe=""))
        _until(page, f"document.querySelector('[data-fact=model] dd')?.textContent "
                               f"=== {json.dumps(EVIL_MODEL)}")
        assert page.inner_text("#title") == f"plant-7 / {EVIL_ID}"
        assert page.evaluate("window.__xss") is None

        # readable on a phone: cards, nothing wider than the screen
        phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
        _watch(phone, problems)
        for path in ("/", "/device/plant-7/pi-0002"):
            phone.goto(url + path)
            _until(phone, "document.getElementById('live').textContent === 'live'")
            assert phone.evaluate("document.scrollingElement.scrollWidth") <= 390, path
        assert phone.evaluate("getComputedStyle(document.querySelector('canvas')).display"
                              ) != "none"
        browser.close()
    assert problems == []


def test_dashboard_api_answers_bad_requests_with_4xx(dashboard: tuple[str, Path]) -> None:
    url, _db = dashboard

    def get(path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(url + path, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    code, body = get("/api/device/plant-7/pi-0000?after_seq=58")
    assert code == 200 and body["telemetry"]["seq"] == [59, 60]
    assert body["device"]["headroom_bytes"] == 80 * MIB
    assert get("/api/device/plant-7/nobody") == (404, {"error": "no device 'nobody' in "
                                                                 "fleet 'plant-7'"})
    assert get("/api/device/plant-7/pi-0000?after_seq=-1")[0] == 400
    assert get("/api/device/plant-7/nobody/stream")[0] == 404
    code, body = get("/api/devices")
    assert code == 200 and body["total"] == 4 and body["over_budget"] == 1
    with urllib.request.urlopen(url + "/", timeout=5) as r:
        csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_dashboard_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    _fleet(db, devices=1, windows=2)
    runner = CliRunner()

    def one_line(args: list[str]) -> str:
        r = runner.invoke(main, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
        return lines[0]

    assert "must be HOST:PORT" in one_line(["fleet", "dashboard", "--db", str(db),
                                            "--http", "localhost"])
    assert "does not exist" in one_line(["fleet", "dashboard", "--db",
                                         str(tmp_path / "none.db")])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in one_line(
            ["fleet", "dashboard", "--db", str(db), "--http", f"127.0.0.1:{port}"])
    down = f"postgresql://fleet@127.0.0.1:{free_port()}/fleet"
    for cmd in (["dashboard"], ["status"], ["report", "--out", str(tmp_path / "r")]):
        line = one_line(["fleet", *cmd, "--db", down])
        assert line.startswith("error: ") and "127.0.0.1" in line, line
    assert "must be a duration" in one_line(["fleet", "prune", "--db", str(db),
                                             "--older-than", "soon"])


def test_fleet_prune_deletes_what_is_older(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    now = time.time()
    _write(db, *(Record("f", "d", _window(i, now, 0), now - (40 if i < 4 else 1) * 86400)
                 for i in range(1, 7)))
    r = CliRunner().invoke(main, ["fleet", "prune", "--db", str(db), "--older-than", "30d"])
    assert r.exit_code == 0, r.output
    assert "3 telemetry" in r.output
    store = open_store(db, create=False)
    assert store.seqs("f", "d") == [4, 5, 6]
    store.close()


def test_status_dashboard_and_metrics_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from toma_edge.host.fleet.metrics_exporter import FleetMetrics

    store = open_store(pg_url)
    now = time.time()
    store.write_batch([
        Record("pg", "pi-1", StatusMessage(online=True, ts=now, model="m", model_version="v2",
                                           budget_bytes=256 * MIB), now),
        *(Record("pg", "pi-1", _window(i, now - 10 * (3 - i), 0), now) for i in (1, 2, 3)),
    ])
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FleetMetrics(store))
    text = generate_latest(reg).decode()
    store.close()
    assert 'toma_edge_device_memory_headroom_bytes{device_id="pi-1",fleet="pg"} 8.388608e+07' \
        in text
    assert ('toma_edge_device_model_info{device_id="pi-1",fleet="pg",model="seed-regression",'
            'version="2026.11.24-1"} 1.0') in text

    r = CliRunner().invoke(main, ["fleet", "status", "--db", pg_url])
    assert r.exit_code == 0 and "pi-1" in r.output and "2026.11.24-1" in r.output, r.output

    port = free_port()
    log = tmp_path / "dashboard.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "toma_edge.cli", "fleet", "dashboard", "--db", pg_url,
             "--http", f"127.0.0.1:{port}"], stdout=out, stderr=out)
    try:
        wait_until(lambda: "dashboard of" in log.read_text() or proc.poll() is not None,
                   30, "the dashboard")
        assert proc.poll() is None, log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/device/pg/pi-1",
                                    timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["telemetry"]["seq"] == [1, 2, 3]
        assert body["device"]["target"] is None and body["device"]["online"] is True
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.returncode == 0 and "Traceback" not in log.read_text()
