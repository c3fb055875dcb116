"""Fleet telemetry bench: the outage scenario and collector ingest, on SQLite and PostgreSQL.

    python bench/bench_telemetry.py                    # everything, about 5 minutes
    python bench/bench_telemetry.py --only outage --store postgresql   # 2 collectors on PG
    python bench/bench_telemetry.py --only ingest --devices 10 --per-device 5000
    python bench/bench_telemetry.py --only pg-insert   # the store alone: COPY vs executemany

Everything is real: mosquitto 2.0 with the shipped fleet config (host/fleet/mosquitto),
device processes running the TelemetryAgent (outage) or bare paho QoS 1 publishers
(ingest: 10 "simulated devices"), `toma-edge fleet collect` processes writing SQLite
(WAL, synchronous=FULL) or PostgreSQL 15 (a server of the bench's own, started like the
tests' with initdb/pg_ctl, fsync and synchronous_commit ON so both stores commit to disk).
Prints Markdown for bench/results/telemetry.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mqtt_fixtures import (  # noqa: E402
    Broker,
    make_pki,
    start_collector,
    start_device,
    wait_until,
)
from pg_fixtures import PgServer  # noqa: E402

SHARE_GROUP = "toma-edge-collectors"


class Db:
    """The store a run writes to, read directly (not through the store under test)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.pg = target.startswith("postgresql://")
        self._conn: Any = None

    @property
    def label(self) -> str:
        return "PostgreSQL" if self.pg else "SQLite"

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.pg:
            import psycopg

            if self._conn is None:
                self._conn = psycopg.connect(self.target, autocommit=True)
            try:
                return list(self._conn.execute(sql).fetchall())
            except psycopg.errors.UndefinedTable:
                return []
        if not Path(self.target).exists():
            return []
        con = sqlite3.connect(self.target, timeout=30)
        try:
            return con.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()

    def count(self, sql: str = "SELECT COUNT(*) FROM telemetry") -> int:
        r = self.rows(sql)
        return int(r[0][0]) if r else 0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for c in procs:
        c.send_signal(signal.SIGTERM)
    for c in procs:
        try:
            c.wait(timeout=30)
        except subprocess.TimeoutExpired:
            c.kill()


def outage(work: Path, pki: dict[str, Path], count: int, rate_hz: float, db: Db,
           collectors: int) -> str:
    """A device publishing ``count`` telemetry messages while the broker is SIGTERMed and
    restarted twice, a collector SIGKILLed and restarted, the device SIGKILLed and
    restarted; then checks the stored rows (``collectors`` > 1: one shared group)."""
    broker = Broker(work / "broker", pki)
    broker.start()
    spool, logs = work / "spool.db", work / "logs"
    logs.mkdir()
    group = SHARE_GROUP if collectors > 1 else None

    def collector(i: int) -> subprocess.Popen[bytes]:
        return start_collector(broker, db=db.target, client_id=f"bench-col-{i}",  # type: ignore[arg-type]
                               log=logs / f"col{i}.log", share_group=group)

    cols = [collector(i) for i in range(collectors)]
    t0 = time.monotonic()
    dev = start_device(broker, device_id="dev-1", spool=spool, count=count, rate_hz=rate_hz,
                       fleet="bench", log=logs / "dev.log")
    steps: list[str] = []

    def at(frac: float) -> None:
        wait_until(lambda: db.count() >= int(count * frac), 600, f"{frac:.0%} stored")

    at(0.1)
    broker.stop(signal.SIGTERM)
    steps.append(f"broker SIGTERM at {db.count()} rows")
    time.sleep(1.0)
    broker.start()
    at(0.3)
    cols[0].send_signal(signal.SIGKILL)
    cols[0].wait()
    steps.append(f"collector SIGKILL at {db.count()} rows")
    time.sleep(1.0)
    cols[0] = collector(0)
    at(0.5)
    dev.send_signal(signal.SIGKILL)
    dev.wait()
    steps.append(f"device SIGKILL at {db.count()} rows")
    dev = start_device(broker, device_id="dev-1", spool=spool, count=count, rate_hz=rate_hz,
                       fleet="bench", log=logs / "dev.log")
    at(0.7)
    broker.stop(signal.SIGTERM)
    steps.append(f"broker SIGTERM at {db.count()} rows")
    time.sleep(1.0)
    broker.start()
    rc = dev.wait(timeout=900)
    try:
        wait_until(lambda: db.count() >= count, 120, "all rows")
    except AssertionError as e:
        steps.append(str(e))
    time.sleep(1.0)
    elapsed = time.monotonic() - t0
    _stop(cols)
    broker.stop()
    seqs = [r[0] for r in db.rows(
        "SELECT seq FROM telemetry WHERE fleet='bench' AND device_id='dev-1' ORDER BY seq")]
    gaps = len(set(range(1, count + 1)) - set(seqs))
    dups = len(seqs) - len(set(seqs))
    per_col = []
    for i in range(collectors):
        lines = [ln for ln in (logs / f"col{i}.log").read_text(errors="replace").splitlines()
                 if ln.startswith("stopped")]
        per_col.append(f"collector {i}: `{lines[-1] if lines else '?'}`")
    return "\n".join([
        f"### Outage scenario on {db.label}, {collectors} collector process"
        f"{'es in one shared group' if collectors > 1 else ''} ({count} telemetry messages, "
        f"{rate_hz:g}/s)", "",
        "Events, in order: " + "; ".join(steps) + ".", "",
        "| rows stored | seq min | seq max | gaps | duplicates | device exit | wall time |",
        "|---|---|---|---|---|---|---|",
        f"| {len(seqs)} | {seqs[0] if seqs else '-'} | {seqs[-1] if seqs else '-'} | {gaps} "
        f"| {dups} | {rc} | {elapsed:.1f} s |", "",
        "Last stop line of each collector (since its last start): " + "; ".join(per_col), ""])


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


def ingest_once(work: Path, pki: dict[str, Path], devices: int, per_device: int, db: Db,
                collectors: int) -> dict[str, Any]:
    """``devices`` bare QoS 1 publishers at once into ``collectors`` collector processes
    (one shared group when > 1); rate from the rows' received_at (first to last stored),
    exactly-once checked per device."""
    broker = Broker(work / "broker", pki)
    broker.start()
    group = SHARE_GROUP if collectors > 1 else None
    cols = [start_collector(broker, db=db.target, client_id=f"bench-ingest-{i}",  # type: ignore[arg-type]
                            log=work / f"col{i}.log", share_group=group)
            for i in range(collectors)]
    total = devices * per_device
    t0 = _publish_all(broker, devices, per_device, "ingest")
    wait_until(lambda: db.count() >= total, 600, "all rows")
    _stop(cols)
    broker.stop()
    lo, hi, n = db.rows("SELECT MIN(received_at), MAX(received_at), COUNT(*) FROM telemetry")[0]
    per_dev = db.rows("SELECT device_id, COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) "
                      "FROM telemetry GROUP BY device_id")
    exact = all(c == d == per_device and a == 1 and b == per_device
                for _, c, d, a, b in per_dev) and len(per_dev) == devices
    shares = []
    for i in range(collectors):
        lines = [ln for ln in (work / f"col{i}.log").read_text(errors="replace").splitlines()
                 if ln.startswith("stopped")]
        nums = [int(w) for w in (lines[-1] if lines else "").replace(",", "").split()
                if w.isdigit()]
        shares.append(nums[1] if len(nums) > 1 else -1)
    return {"store": db.label, "collectors": collectors, "n": int(n), "span": hi - lo,
            "rate": n / (hi - lo), "from_start": n / (hi - t0), "exact": exact,
            "shares": shares}


def ingest(work: Path, pki: dict[str, Path], devices: int, per_device: int,
           pg: PgServer | None, pg_collectors: list[int], rounds: int) -> str:
    """SQLite with one collector against PostgreSQL with 1, 2, 3 collectors, in one run
    (rounds interleaved, a fresh broker and database each)."""
    results: list[dict[str, Any]] = []
    configs: list[tuple[str, int]] = [("sqlite", 1)]
    if pg is not None:
        configs += [("postgresql", c) for c in pg_collectors]
    for r in range(rounds):
        for kind, ncol in configs:
            folder = work / f"{kind}-{ncol}-{r}"
            folder.mkdir()
            db = Db(pg.create_db(f"ingest_{ncol}_{r}") if kind == "postgresql" and pg
                    else str(folder / "fleet.db"))
            results.append(ingest_once(folder, pki, devices, per_device, db, ncol))
            db.close()
            print(f"  round {r}: {kind} x{ncol}: {results[-1]['rate']:,.0f} msg/s", flush=True)
    lines = [f"### Collector ingest, {devices} devices x {per_device} messages at once "
             f"(QoS 1), {rounds} round(s) interleaved", "",
             "| store | collectors | messages stored | first to last stored | ingest rate "
             "| from publish start | exactly once | stored per collector |",
             "|---|---|---|---|---|---|---|---|"]
    for x in results:
        lines.append(
            f"| {x['store']} | {x['collectors']} | {x['n']} | {x['span']:.2f} s "
            f"| **{x['rate']:,.0f} msg/s** | {x['from_start']:,.0f} msg/s "
            f"| {'yes' if x['exact'] else 'NO'} | {' + '.join(map(str, x['shares']))} |")

    def median(kind: str, ncol: int) -> float:
        v = sorted(x["rate"] for x in results
                   if x["store"] == kind and x["collectors"] == ncol)
        return v[len(v) // 2] if v else float("nan")

    base = median("SQLite", 1)
    lines += ["", "Median ingest rate:", "", f"- SQLite, 1 collector: {base:,.0f} msg/s"]
    for c in pg_collectors if pg is not None else []:
        m = median("PostgreSQL", c)
        lines.append(f"- PostgreSQL, {c} collector(s): {m:,.0f} msg/s "
                     f"(**{m / base:.2f}x** SQLite's)")
    return "\n".join(lines) + "\n"


def pg_insert(pg: PgServer, work: Path, rows: int = 20_000, batch: int = 500,
              rounds: int = 3) -> str:
    """The store alone, no broker: write_batch of ``batch`` telemetry rows (10 devices) by
    each PostgreSQL insert method, and SQLite, rounds interleaved; rows/s committed."""
    from toma_edge.host.fleet.store import FleetStore, Record
    from toma_edge.host.fleet.store_pg import METHODS, PgFleetStore
    from toma_edge.telemetry import TelemetryMessage

    t = time.time()
    recs = [Record("b", f"dev-{i % 10}", TelemetryMessage(
        seq=i // 10 + 1, ts=t, window_s=10.0, requests=100, latency_p99_s=0.02,
        rss_bytes=100 << 20, peak_rss_bytes=110 << 20, budget_bytes=256 << 20), t)
        for i in range(rows)]
    batches = [recs[i:i + batch] for i in range(0, rows, batch)]
    got: dict[str, list[float]] = {}
    for r in range(rounds):
        for m in (*METHODS, "sqlite"):
            store: Any = (FleetStore(work / f"ins-{r}.db") if m == "sqlite"
                          else PgFleetStore(pg.create_db(f"ins_{m}_{r}"), method=m))
            t0 = time.perf_counter()
            for b in batches:
                store.write_batch(b)
            got.setdefault(m, []).append(rows / (time.perf_counter() - t0))
            assert store.count() == rows
            store.close()
    lines = [f"### Store alone: write_batch of {batch} telemetry rows, {rows} rows, "
             f"{rounds} rounds interleaved (rows/s committed)", "",
             "| method | " + " | ".join(f"round {i + 1}" for i in range(rounds))
             + " | median |", "|---|" + "---|" * (rounds + 1)]
    for m, v in got.items():
        name = "SQLite (executemany)" if m == "sqlite" else f"PostgreSQL {m}"
        lines.append(f"| {name} | " + " | ".join(f"{x:,.0f}" for x in v)
                     + f" | **{sorted(v)[len(v) // 2]:,.0f}** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--only", choices=["outage", "ingest", "pg-insert"])
    ap.add_argument("--store", choices=["sqlite", "postgresql", "both"], default="both",
                    help="outage: which store(s); PostgreSQL runs two collectors")
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--per-device", type=int, default=5000)
    ap.add_argument("--pg-collectors", default="1,2,3")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    need_pg = a.only in (None, "pg-insert", "ingest") or a.store != "sqlite"
    pg = PgServer.start_new(fsync=True) if need_pg else None
    try:
        with tempfile.TemporaryDirectory(prefix="toma-bench-") as tmp:
            work = Path(tmp)
            pki = make_pki(work / "pki")
            if a.only in (None, "pg-insert") and pg is not None:
                (work / "p").mkdir()
                print(pg_insert(pg, work / "p"), flush=True)
            if a.only in (None, "outage"):
                for kind in (["sqlite", "postgresql"] if a.store == "both" else [a.store]):
                    folder = work / f"o-{kind}"
                    folder.mkdir()
                    db = Db(pg.create_db("outage") if kind == "postgresql" and pg
                            else str(folder / "fleet.db"))
                    print(outage(folder, pki, a.count, a.rate, db,
                                 2 if kind == "postgresql" else 1), flush=True)
                    db.close()
            if a.only in (None, "ingest"):
                (work / "i").mkdir()
                print(ingest(work / "i", pki, a.devices, a.per_device, pg,
                             [int(x) for x in a.pg_collectors.split(",") if x], a.rounds),
                      flush=True)
    finally:
        if pg is not None:
            pg.cleanup()


if __name__ == "__main__":
    main()
