"""Fleet telemetry bench: the outage scenario, collector ingest rate, two collectors splitting.

    python bench/bench_telemetry.py                    # all three, about 2 minutes
    python bench/bench_telemetry.py --only ingest --devices 10 --per-device 5000
    python bench/bench_telemetry.py --only outage --count 10000

Everything is real: mosquitto 2.0 with the shipped fleet config (host/fleet/mosquitto),
device processes running the TelemetryAgent (outage) or bare paho QoS 1 publishers
(ingest: 10 "simulated devices"), and `toma-edge fleet collect` processes writing SQLite.
Prints Markdown for bench/results/telemetry.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mqtt_fixtures import (  # noqa: E402
    Broker,
    make_pki,
    start_collector,
    start_device,
    wait_until,
)


def _db_count(db: Path, sql: str = "SELECT COUNT(*) FROM telemetry") -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(str(db), timeout=30)
    try:
        return int(con.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def outage(work: Path, pki: dict[str, Path], count: int, rate_hz: float) -> str:
    """A device publishing ``count`` telemetry messages while the broker is SIGTERMed and
    restarted twice, the collector SIGKILLed and restarted, the device SIGKILLed and
    restarted; then checks the collector's rows."""
    broker = Broker(work / "broker", pki)
    broker.start()
    db, spool, logs = work / "fleet.db", work / "spool.db", work / "logs"
    logs.mkdir()
    col = start_collector(broker, db=db, client_id="bench-col", log=logs / "col.log")
    t0 = time.monotonic()
    dev = start_device(broker, device_id="dev-1", spool=spool, count=count, rate_hz=rate_hz,
                       fleet="bench", log=logs / "dev.log")
    steps: list[str] = []

    def at(frac: float) -> None:
        wait_until(lambda: _db_count(db) >= int(count * frac), 600, f"{frac:.0%} stored")

    at(0.1)
    broker.stop(signal.SIGTERM)
    steps.append(f"broker SIGTERM at {_db_count(db)} rows")
    time.sleep(1.0)
    broker.start()
    at(0.3)
    col.send_signal(signal.SIGKILL)
    col.wait()
    steps.append(f"collector SIGKILL at {_db_count(db)} rows")
    time.sleep(1.0)
    col = start_collector(broker, db=db, client_id="bench-col", log=logs / "col.log")
    at(0.5)
    dev.send_signal(signal.SIGKILL)
    dev.wait()
    steps.append(f"device SIGKILL at {_db_count(db)} rows")
    dev = start_device(broker, device_id="dev-1", spool=spool, count=count, rate_hz=rate_hz,
                       fleet="bench", log=logs / "dev.log")
    at(0.7)
    broker.stop(signal.SIGTERM)
    steps.append(f"broker SIGTERM at {_db_count(db)} rows")
    time.sleep(1.0)
    broker.start()
    rc = dev.wait(timeout=900)
    wait_until(lambda: _db_count(db) >= count, 120, "all rows")
    time.sleep(1.0)
    elapsed = time.monotonic() - t0
    col.send_signal(signal.SIGTERM)
    col.wait(timeout=30)
    broker.stop()
    con = sqlite3.connect(str(db))
    seqs = [r[0] for r in con.execute(
        "SELECT seq FROM telemetry WHERE fleet='bench' AND device_id='dev-1' ORDER BY seq")]
    con.close()
    gaps = len(set(range(1, count + 1)) - set(seqs))
    dups = len(seqs) - len(set(seqs))
    return "\n".join([
        f"### Outage scenario ({count} telemetry messages, {rate_hz:g}/s)", "",
        "Events, in order: " + "; ".join(steps) + ".", "",
        "| rows stored | seq min | seq max | gaps | duplicates | device exit | wall time |",
        "|---|---|---|---|---|---|---|",
        f"| {len(seqs)} | {seqs[0] if seqs else '-'} | {seqs[-1] if seqs else '-'} | {gaps} "
        f"| {dups} | {rc} | {elapsed:.1f} s |", ""])


def _publisher(url_port: int, user: str, password: str, fleet: str, n: int,
               start_at: float) -> None:
    import paho.mqtt.client as mqtt

    from toma_edge.telemetry import TelemetryMessage, topic

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{user}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.max_inflight_messages_set(200)
    c.connect("127.0.0.1", url_port)
    c.loop_start()
    t = topic(fleet, user, "telemetry")
    payloads = [TelemetryMessage(seq=s, ts=time.time(), window_s=10.0, requests=100,
                                 latency_p99_s=0.02, rss_bytes=100 << 20,
                                 peak_rss_bytes=110 << 20, budget_bytes=256 << 20).encode()
                for s in range(1, n + 1)]
    time.sleep(max(0.0, start_at - time.time()))
    infos = [c.publish(t, p, qos=1) for p in payloads]
    for i in infos:
        i.wait_for_publish(600)
    c.disconnect()
    c.loop_stop()


def _publish_all(broker: Broker, devices: int, per_device: int, fleet: str) -> float:
    from mqtt_fixtures import password_for

    start_at = time.time() + 1.0
    procs = [mp.Process(target=_publisher, args=(broker.port, f"dev-{i}", password_for(f"dev-{i}"),
                                                 fleet, per_device, start_at))
             for i in range(devices)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return start_at


def ingest(work: Path, pki: dict[str, Path], devices: int, per_device: int) -> str:
    """10 bare QoS 1 publishers at once into one collector process; rate from the rows'
    received_at (first to last stored), exactly-once checked per device."""
    broker = Broker(work / "broker", pki)
    broker.start()
    db = work / "fleet.db"
    col = start_collector(broker, db=db, client_id="bench-ingest", log=work / "col.log")
    total = devices * per_device
    t0 = _publish_all(broker, devices, per_device, "ingest")
    lo, hi, n = _drain(col, broker, db, total)
    con = sqlite3.connect(str(db))
    per_dev = con.execute("SELECT device_id, COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) "
                          "FROM telemetry GROUP BY device_id").fetchall()
    con.close()
    exact = all(c == d == per_device and a == 1 and b == per_device
                for _, c, d, a, b in per_dev) and len(per_dev) == devices
    stats = [ln for ln in (work / "col.log").read_text().splitlines() if ln.startswith("stopped")]
    backlog = _backlog(work, pki, devices, per_device)
    return "\n".join([
        f"### Collector ingest ({devices} devices x {per_device} messages, QoS 1, at once)", "",
        "| messages stored | first to last stored | ingest rate | from publish start "
        "| exactly once per (device, seq) |",
        "|---|---|---|---|---|",
        f"| {n} | {hi - lo:.2f} s | **{n / (hi - lo):,.0f} msg/s** | {n / (hi - t0):,.0f} msg/s "
        f"| {'yes' if exact else 'NO'} |", "",
        f"Collector: `{stats[-1] if stats else '?'}`", "",
        f"Same load queued first on the collector's persistent session while it was stopped "
        f"(the collector alone, publishers not competing for the CPU): drained and stored "
        f"{total} messages at **{backlog:,.0f} msg/s**.", ""])


def _backlog(work: Path, pki: dict[str, Path], devices: int, per_device: int) -> float:
    broker = Broker(work / "broker-b", pki)
    broker.start()
    db = work / "backlog.db"
    col = start_collector(broker, db=db, client_id="bench-backlog", log=work / "colb.log")
    col.send_signal(signal.SIGTERM)
    col.wait(timeout=30)
    total = devices * per_device
    _publish_all(broker, devices, per_device, "backlog")
    col = start_collector(broker, db=db, client_id="bench-backlog", log=work / "colb.log")
    lo, hi, n = _drain(col, broker, db, total)
    return float(n / (hi - lo))


def _drain(col, broker: Broker, db: Path, total: int) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """Wait until ``total`` rows are stored, stop the collector and the broker; the first
    and last storage times and the row count."""
    wait_until(lambda: _db_count(db) >= total, 600, "all rows")
    col.send_signal(signal.SIGTERM)
    col.wait(timeout=30)
    broker.stop()
    con = sqlite3.connect(str(db))
    lo, hi, n = con.execute("SELECT MIN(received_at), MAX(received_at), COUNT(*) FROM telemetry"
                            ).fetchone()
    con.close()
    return float(lo), float(hi), int(n)


def split(work: Path, pki: dict[str, Path], devices: int, per_device: int) -> str:
    """Two collector processes in one shared-subscription group."""
    broker = Broker(work / "broker", pki)
    broker.start()
    db = work / "fleet.db"
    cols = [start_collector(broker, db=db, client_id=f"bench-split-{i}",
                            log=work / f"col{i}.log", share_group="toma-edge-collectors")
            for i in range(2)]
    total = devices * per_device
    _publish_all(broker, devices, per_device, "split")
    wait_until(lambda: _db_count(db) >= total, 600, "all rows")
    time.sleep(0.5)
    rows = []
    for i, c in enumerate(cols):
        c.send_signal(signal.SIGTERM)
        c.wait(timeout=30)
        line = [ln for ln in (work / f"col{i}.log").read_text().splitlines()
                if ln.startswith("stopped")][-1]
        nums = [int(w) for w in line.replace(",", "").split() if w.isdigit()]
        rows.append(f"| collector {i} | {nums[1]} | {nums[2]} |")
    broker.stop()
    n = _db_count(db)
    distinct = _db_count(db, "SELECT COUNT(*) FROM (SELECT DISTINCT device_id, seq FROM telemetry)")
    return "\n".join([
        f"### Two collectors, one shared subscription ({devices} x {per_device} messages)", "",
        "| collector | stored | duplicates |", "|---|---|---|", *rows,
        f"| together | {n} (distinct (device, seq): {distinct}, expected {total}) | |", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["outage", "ingest", "split"])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--per-device", type=int, default=5000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="toma-bench-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        out = []
        if a.only in (None, "outage"):
            (work / "o").mkdir()
            out.append(outage(work / "o", pki, a.count, a.rate))
            print(out[-1], flush=True)
        if a.only in (None, "ingest"):
            (work / "i").mkdir()
            out.append(ingest(work / "i", pki, a.devices, a.per_device))
            print(out[-1], flush=True)
        if a.only in (None, "split"):
            (work / "s").mkdir()
            out.append(split(work / "s", pki, a.devices, 1000))
            print(out[-1], flush=True)


if __name__ == "__main__":
    main()
