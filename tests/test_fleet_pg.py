"""Several collector processes in one shared subscription group writing to one PostgreSQL:
nothing lost, nothing doubled (real mosquitto, real PostgreSQL 15, real processes).

    python -m pytest -q tests/test_fleet_pg.py
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mqtt_fixtures import Broker, start_collector, start_device, wait_until

from toma_edge.host.fleet.collector import SHARE_GROUP
from toma_edge.host.fleet.store import open_store

if TYPE_CHECKING:
    from collections.abc import Callable

pytest_plugins = ["pg_fixtures"]  # pg_server, pg_url


def _count(url: str) -> int:
    with open_store(url) as s:
        return s.count()


def test_collectors_in_processes_share_one_postgres(
        broker_factory: Callable[[], Broker], pg_url: str, tmp_path: Path) -> None:
    broker = broker_factory()
    logs = tmp_path / "logs"
    logs.mkdir()
    cols = [start_collector(broker, db=pg_url, client_id=f"pg-col-{i}",  # type: ignore[arg-type]
                            share_group=SHARE_GROUP, log=logs / f"col{i}.log")
            for i in range(2)]
    count, devices = 400, 4
    devs = [start_device(broker, device_id=f"dev-{i}", spool=tmp_path / f"spool{i}.db",
                         count=count, rate_hz=200, fleet="pg", log=logs / f"dev{i}.log")
            for i in range(devices)]
    try:
        total = count * devices
        wait_until(lambda: _count(pg_url) >= total // 3, 120, "a third stored")
        cols[1].send_signal(signal.SIGKILL)  # unacked messages go to the other member
        cols[1].wait()
        wait_until(lambda: _count(pg_url) >= total // 2, 120, "half stored")
        cols[1] = start_collector(broker, db=pg_url, client_id="pg-col-1",  # type: ignore[arg-type]
                                  share_group=SHARE_GROUP, log=logs / "col1.log")
        for d in devs:
            assert d.wait(timeout=180) == 0, (logs / "dev0.log").read_text()[-2000:]
        wait_until(lambda: _count(pg_url) >= total, 120, "every message stored")
    finally:
        for c in cols:
            c.send_signal(signal.SIGTERM)
        for c in cols:
            try:
                c.wait(timeout=30)
            except subprocess.TimeoutExpired:
                c.kill()
    with open_store(pg_url) as s:
        for i in range(devices):
            assert s.seqs("pg", f"dev-{i}") == list(range(1, count + 1))
        assert s.count() == total
        assert s.count("rejects") == 0
        # both collectors stored a share (the shared group split the devices' messages)
        stored = [ln for i in range(2) for ln in (logs / f"col{i}.log").read_text().splitlines()
                  if ln.startswith("stopped")]
        assert len(stored) >= 2, stored


def test_fleet_status_and_report_on_postgres(pg_url: str, tmp_path: Path) -> None:
    """`fleet status` and `fleet report` read a PostgreSQL store like a SQLite one."""
    from test_fleet_store import event, status, tel

    with open_store(pg_url) as s:
        s.write_batch([tel("d1", i) for i in range(1, 6)] + [status("d1", True, 1.7e9),
                                                              event("d1", 1)])
    env_cmd = [sys.executable, "-m", "toma_edge.cli", "fleet"]
    r = subprocess.run([*env_cmd, "status", "--db", pg_url], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "d1" in r.stdout and "online" in r.stdout
    out = tmp_path / "report"
    r = subprocess.run([*env_cmd, "report", "--db", pg_url, "--out", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert (out / "f__d1__latency.png").stat().st_size > 1000
    assert pg_url.split("@")[1] in (out / "README.md").read_text()
    # an unreachable server: one line, exit 2
    dead = pg_url.rsplit(":", 1)[0] + ":1/nope"
    r = subprocess.run([*env_cmd, "status", "--db", dead], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
