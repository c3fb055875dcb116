"""Soak run: `toma-edge serve` with its telemetry agent on a real broker, under mixed valid
and hostile traffic over HTTP and MQTT, for ten minutes or more.

    python bench/bench_soak.py                       # 600 s, writes bench/results/soak.md + PNG
    python bench/bench_soak.py --seconds 60          # a short look

One mosquitto with the shipped config and ACL, one `toma-edge fleet collect` process, one
`toma-edge serve` process (the built-in example, HTTP + MQTT + telemetry every second),
and in this script:

- valid HTTP clients: 1-8 random rows per request; every answer is compared with the
  Predictor run offline on that request's rows (atol 1e-5);
- hostile HTTP clients: deep nesting, 400-digit integers, strings and booleans as
  numbers, invalid UTF-8, ragged rows, wrong widths, NaN text, .npy bodies with lying
  headers and bad dtypes, wrong content types, truncated bodies, idle sockets held open;
  every answer must be a 4xx, never a 5xx or a dropped connection;
- valid MQTT clients (MQTT v5 Response Topic + Correlation Data), answers checked;
- hostile MQTT requests (the same bodies, plus reply_to with a lone surrogate, a NUL,
  wildcards, a foreign prefix, an over-long topic);
- hostile telemetry from a second device identity (wrong types, missing "v", huge seq,
  garbage bytes) that the collector must dead-letter without stalling.

Pass criteria, all checked at the end: 0 wrong answers to valid requests, 0 valid requests
unanswered, 0 hostile requests answered 5xx, /healthz always "ok" with the MQTT front end
taking requests, the serve process's RSS within its budget at every sample, and the
collector holding the agent's telemetry seqs 1..N exactly once (N = the last seq issued,
read from the agent's spool after shutdown).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from mqtt_fixtures import Broker, free_port, make_pki, wait_until  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "toma-edge-bench-soak"
OUT = REPO / "bench" / "results" / "soak.md"
PNG = REPO / "bench" / "results" / "soak_rss.png"
FLEET = "soak"
DEVICE = "dev-0"
HOSTILE_DEVICE = "dev-1"
MQTT_VALID_USER = "client-app"
MQTT_HOSTILE_USER = "dev-5"
BUDGET = "256MiB"


# -- traffic ----------------------------------------------------------------------------
def hostile_json_bodies(rng: random.Random) -> bytes:
    """One hostile JSON-ish request body."""
    k = rng.randrange(12)
    if k == 0:
        d = rng.choice([100, 1000, 10_000])
        return b'{"inputs": ' + b"[" * d + b"]" * d + b"}"
    if k == 1:
        return b'{"inputs": [[1' + b"0" * 400 + b", 0,0,0,0,0,0,0,0,0]]}"
    if k == 2:
        return b'{"inputs": [["0.1","0.2","0.3","0.4","0.5","0.6","0.7","0.8","0.9","1.0"]]}'
    if k == 3:
        return b'{"inputs": [[true, false, true, 0, 0, 0, 0, 0, 0, 0]]}'
    if k == 4:
        return b'{"inputs": [[0.1, 0.2\xff\xfe]]}'
    if k == 5:
        return b'{"inputs": [[0.1, 0.2], [0.3]]}'
    if k == 6:
        return json.dumps({"inputs": [[0.5] * rng.choice([0, 1, 9, 11, 64])]}).encode()
    if k == 7:
        return b'{"inputs": [[NaN, 0, 0, 0, 0, 0, 0, 0, 0, 0]]}'
    if k == 8:
        return b'{"inputs": [[1e39, 0, 0, 0, 0, 0, 0, 0, 0, 0]]}'
    if k == 9:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
    if k == 10:
        return b'{"inputs": {"a": 1}}'
    return b'{"inputs": [[0.1, 0.2, 0.3'  # truncated


def hostile_npy(rng: random.Random) -> bytes:
    """A .npy body whose header lies or whose dtype is not numeric."""
    k = rng.randrange(4)
    if k == 0:  # header claims a billion rows
        hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 10), }"
    elif k == 1:
        hdr = "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 10), }"
    elif k == 2:
        hdr = "{'descr': '<U3', 'fortran_order': False, 'shape': (2, 10), }"
    else:
        hdr = "{'descr': '|O', 'fortran_order': False, 'shape': (2, 10), }"
    hdr = hdr + " " * (118 - len(hdr)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(hdr).to_bytes(2, "little") + hdr.encode() + b"\0" * 80


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.c[key] = self.c.get(key, 0) + n


def http_valid(port: int, stop: threading.Event, predictor: Any, st: Stats, seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        rows = rng.uniform(0, 1, size=(int(rng.integers(1, 9)), 10)).astype(np.float32)
        want = predictor.predict(rows).outputs
        try:
            c.request("POST", "/v1/predict", json.dumps({"inputs": rows.tolist()}),
                      {"Content-Type": "application/json"})
            r = c.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException):
            st.add("http_valid_lost")
            c.close()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        if r.status == 200:
            got = np.array(json.loads(body)["outputs"], dtype=np.float32)
            ok = got.shape == want.shape and np.allclose(got, want, atol=1e-5, rtol=0)
            st.add("http_valid_right" if ok else "http_valid_wrong")
        elif r.status == 503:
            st.add("http_valid_overload")
        else:
            st.add(f"http_valid_status_{r.status}")
        time.sleep(0.002)


def http_hostile(port: int, stop: threading.Event, st: Stats, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        kind = rng.randrange(10)
        try:
            if kind < 6:
                c.request("POST", "/v1/predict", hostile_json_bodies(rng),
                          {"Content-Type": "application/json"})
            elif kind < 8:
                c.request("POST", "/v1/predict", hostile_npy(rng),
                          {"Content-Type": "application/x-npy"})
            elif kind == 8:
                c.request("POST", "/v1/predict", b"inputs=1", {"Content-Type": "text/plain"})
            else:  # a Content-Length that lies (shorter body, then close)
                c.putrequest("POST", "/v1/predict")
                c.putheader("Content-Type", "application/json")
                c.putheader("Content-Length", "1000")
                c.endheaders()
                c.send(b'{"inputs": [[0.1')
                c.sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
            r = c.getresponse()
            r.read()
            if 400 <= r.status < 500:
                st.add("http_hostile_4xx")
            elif r.status >= 500:
                st.add(f"http_hostile_5xx_{r.status}")
            else:
                st.add(f"http_hostile_status_{r.status}")
        except (OSError, http.client.HTTPException):
            st.add("http_hostile_closed")  # fine for a lying Content-Length
        finally:
            c.close()
        time.sleep(0.01)


def idle_sockets(port: int, stop: threading.Event, st: Stats, n: int = 200) -> None:
    """Hold ``n`` idle sockets open; reopen the ones the server closes (it should)."""
    socks: list[socket.socket] = []
    while not stop.is_set():
        while len(socks) < n and not stop.is_set():
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                st.add("idle_connect_refused")
                break
        alive = []
        for s in socks:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    st.add("idle_closed_by_server")
                    s.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                continue
            alive.append(s)
        socks = alive
        stop.wait(1.0)
    for s in socks:
        s.close()


def mqtt_client(broker: Broker, user: str) -> Any:
    from toma_edge.telemetry import make_client

    client = make_client(broker.settings(user), client_id=user)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return client


def mqtt_valid(broker: Broker, stop: threading.Event, predictor: Any, st: Stats) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    rng = np.random.default_rng(7)
    pending: dict[bytes, tuple[np.ndarray, float]] = {}
    lock = threading.Lock()
    resp = f"toma-edge/v1/{FLEET}/{DEVICE}/infer/response/{MQTT_VALID_USER}/soak"

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        cd = getattr(msg.properties, "CorrelationData", None)
        with lock:
            item = pending.pop(cd, None) if cd is not None else None
        if item is None:
            st.add("mqtt_valid_unmatched")
            return
        try:
            got = np.array(json.loads(msg.payload)["outputs"], dtype=np.float32)
            ok = got.shape == item[0].shape and np.allclose(got, item[0], atol=1e-5, rtol=0)
        except (KeyError, ValueError):
            ok = False
        st.add("mqtt_valid_right" if ok else "mqtt_valid_wrong")

    client = mqtt_client(broker, MQTT_VALID_USER)
    client.on_message = on_message
    client.subscribe(resp, qos=1)
    time.sleep(0.5)
    i = 0
    while not stop.is_set():
        rows = rng.uniform(0, 1, size=(int(rng.integers(1, 5)), 10)).astype(np.float32)
        cd = f"req-{i}".encode()
        i += 1
        with lock:
            pending[cd] = (predictor.predict(rows).outputs, time.monotonic())
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = resp
        props.CorrelationData = cd
        client.publish(f"toma-edge/v1/{FLEET}/{DEVICE}/infer/request",
                       json.dumps({"inputs": rows.tolist()}), qos=1, properties=props)
        st.add("mqtt_valid_sent")
        time.sleep(0.02)
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        time.sleep(0.1)
    st.add("mqtt_valid_unanswered", len(pending))
    client.loop_stop()
    client.disconnect()


def mqtt_hostile(broker: Broker, stop: threading.Event, st: Stats) -> None:
    rng = random.Random(11)
    client = mqtt_client(broker, MQTT_HOSTILE_USER)
    mine = f"toma-edge/v1/{FLEET}/{DEVICE}/infer/response/{MQTT_HOSTILE_USER}"
    replies = ['"\\ud800"', '"' + mine + '/a\\u0000b"', '"' + mine + '/+"', '"' + mine + '/#"',
               '"toma-edge/v1/other/x/status"', '"' + mine + "/" + "x" * 70_000 + '"', "17",
               "null", '"' + mine + '/ok"']
    while not stop.is_set():
        if rng.random() < 0.5:
            body = hostile_json_bodies(rng)
        else:
            body = (b'{"inputs": [[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]], "reply_to": '
                    + rng.choice(replies).encode() + b', "id": "h"}')
        client.publish(f"toma-edge/v1/{FLEET}/{DEVICE}/infer/request", body, qos=1)
        st.add("mqtt_hostile_sent")
        time.sleep(0.02)
    client.loop_stop()
    client.disconnect()


def telemetry_hostile(broker: Broker, stop: threading.Event, st: Stats) -> None:
    rng = random.Random(5)
    client = mqtt_client(broker, HOSTILE_DEVICE)
    t = f"toma-edge/v1/{FLEET}/{HOSTILE_DEVICE}/telemetry"
    bodies = [b'{"v": 1, "seq": "3", "ts": 1.0, "window_s": 1.0}',
              b'{"v": 1, "seq": true, "ts": 1.0, "window_s": 1.0}',
              b'{"seq": 4, "ts": 1.0, "window_s": 1.0}',
              b'{"v": 1, "seq": 9223372036854775808, "ts": 1.0, "window_s": 1.0}',
              b"\xff\xfe garbage", b"", b"[" * 5000]
    while not stop.is_set():
        client.publish(t, rng.choice(bodies), qos=1)
        st.add("telemetry_hostile_sent")
        time.sleep(0.2)
    client.loop_stop()
    client.disconnect()


def sampler(pid: int, port: int, stop: threading.Event, samples: list[tuple[float, float]],
            health: list[str], t0: float) -> None:
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    samples.append((time.monotonic() - t0, int(line.split()[1]) / 1024))
        except OSError:
            return
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/healthz")
            h = json.loads(c.getresponse().read())
            c.close()
            mqtt = h.get("mqtt") or {}
            taking = mqtt.get("taking_requests", mqtt.get("connected"))
            health.append(f"{h.get('status')}/{'taking' if taking else 'NOT-taking'}")
        except (OSError, http.client.HTTPException, ValueError) as e:
            health.append(f"unreachable: {e}")
        stop.wait(0.5)


# -- the run ----------------------------------------------------------------------------
def example_bundle() -> Path:
    b = WORK / "bundle"
    if not (b / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "toma_edge.cli", "build", "--target", "rpi",
                        "--out", str(b)], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--bundle", type=Path, default=None)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or example_bundle()
    from toma_edge.budget import parse_size
    from toma_edge.device.predictor import Predictor

    budget_mib = parse_size(BUDGET) / 2**20
    predictor = Predictor(bundle, threads=1, budget="16GiB")
    run = Path(tempfile.mkdtemp(dir=WORK))
    broker = Broker(run / "broker", make_pki(run / "pki"))
    broker.start()
    db = run / "fleet.db"
    col_log = run / "collector.log"
    collector = subprocess.Popen(
        [sys.executable, "-m", "toma_edge.cli", "fleet", "collect", "--mqtt",
         broker.url("collector"), "--db", str(db)],
        env=broker.env("collector"), stdout=open(col_log, "ab"), stderr=subprocess.STDOUT)
    wait_until(lambda: "collecting from" in col_log.read_text(errors="replace")
               or collector.poll() is not None, 30, "the collector")
    port = free_port()
    spool = run / "spool.db"
    serve_log = run / "serve.log"
    env = broker.env(DEVICE)
    env["OMP_NUM_THREADS"] = "1"
    serve = subprocess.Popen(
        [sys.executable, "-m", "toma_edge.cli", "serve", str(bundle), "--http",
         f"127.0.0.1:{port}", "--mqtt", broker.url(DEVICE), "--fleet", FLEET, "--device-id",
         DEVICE, "--budget", BUDGET, "--threads", "1", "--telemetry-interval", "1",
         "--spool", str(spool)],
        env=env, stdout=open(serve_log, "ab"), stderr=subprocess.STDOUT)

    def up() -> bool:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            h = json.loads(c.getresponse().read())
            return bool((h.get("mqtt") or {}).get("connected"))
        except (OSError, ValueError, http.client.HTTPException):
            return False

    wait_until(lambda: up() or serve.poll() is not None, 60, "serve to come up")
    if serve.poll() is not None:
        raise SystemExit(f"serve exited: {serve_log.read_text()[-2000:]}")
    print(f"soak: serve pid {serve.pid} on :{port}, broker :{broker.port}, "
          f"{args.seconds:.0f} s", flush=True)

    st = Stats()
    stop = threading.Event()
    samples: list[tuple[float, float]] = []
    health: list[str] = []
    t0 = time.monotonic()
    threads = [
        threading.Thread(target=http_valid, args=(port, stop, predictor, st, s))
        for s in range(3)
    ] + [
        threading.Thread(target=http_hostile, args=(port, stop, st, s)) for s in range(2)
    ] + [
        threading.Thread(target=idle_sockets, args=(port, stop, st)),
        threading.Thread(target=mqtt_valid, args=(broker, stop, predictor, st)),
        threading.Thread(target=mqtt_hostile, args=(broker, stop, st)),
        threading.Thread(target=telemetry_hostile, args=(broker, stop, st)),
        threading.Thread(target=sampler, args=(serve.pid, port, stop, samples, health, t0)),
    ]
    for t in threads:
        t.start()
    last = 0.0
    while time.monotonic() - t0 < args.seconds and serve.poll() is None:
        time.sleep(1.0)
        if time.monotonic() - last > 60:
            last = time.monotonic()
            print(f"  {time.monotonic() - t0:5.0f} s  {dict(sorted(st.c.items()))}", flush=True)
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    died = serve.poll()

    # shut down: SIGTERM (what systemd does), then read what the agent issued
    t_term = time.monotonic()
    serve.send_signal(signal.SIGTERM)
    rc = serve.wait(60)
    stop_s = time.monotonic() - t_term
    time.sleep(3.0)  # let the collector commit the last windows
    collector.send_signal(signal.SIGTERM)
    collector.wait(60)
    broker.stop()
    fdb = sqlite3.connect(str(db))
    seqs = [r[0] for r in fdb.execute(
        "SELECT seq FROM telemetry WHERE fleet = ? AND device_id = ? ORDER BY seq",
        (FLEET, DEVICE))]
    rejected = fdb.execute("SELECT COALESCE(SUM(count), 0) FROM rejected").fetchone()[0]
    fdb.close()
    n_issued, pending = _spool_telemetry(spool)
    contiguous = seqs == list(range(1, len(seqs) + 1))

    peak = max((m for _, m in samples), default=float("nan"))
    not_ok = [h for h in health if h != "ok/taking"]
    c = dict(sorted(st.c.items()))
    bad = {k: v for k, v in c.items() if v and ("wrong" in k or "5xx" in k or "lost" in k
           or "unanswered" in k or k.startswith("http_valid_status"))}
    lines = [
        f"## Soak: {elapsed:.0f} s of mixed valid and hostile traffic (`python bench/bench_soak.py"
        f" --seconds {args.seconds:.0f}`)",
        "",
        f"Load average at the end: {os.getloadavg()[0]:.2f} (2 cores). serve: the built-in "
        f"example, budget {BUDGET}, telemetry every 1 s; one collector (SQLite).",
        "",
        "| counter | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in c.items()],
        "",
        f"- serve alive throughout: {'yes' if died is None else f'NO (exit {died})'}; "
        f"exit code after SIGTERM {rc}, stopped in {stop_s:.2f} s",
        f"- RSS samples: {len(samples)}, peak {peak:.1f} MiB against the {budget_mib:.0f} MiB "
        f"budget ({'within' if peak <= budget_mib else 'OVER'})",
        f"- /healthz samples: {len(health)}, not ok/taking: {len(not_ok)} "
        f"{sorted(set(not_ok))[:5]}",
        f"- telemetry: {len(seqs)} windows stored for {DEVICE}, seqs 1..{len(seqs)} "
        f"{'contiguous, each once' if contiguous else 'NOT contiguous'}; {pending} still "
        f"spooled at exit (leave on the next start); {n_issued} issued; dead-lettered or "
        f"rejected from {HOSTILE_DEVICE}: {rejected}",
        f"- failures (wrong, lost, 5xx, unanswered): {bad or 'none'}",
        "",
    ]
    passed = (not bad and died is None and peak <= budget_mib and not not_ok and contiguous
              and len(seqs) <= n_issued <= len(seqs) + pending)
    lines.append(f"**{'PASS' if passed else 'FAIL'}**")
    lines.append("")
    print("\n".join(lines), flush=True)
    OUT.write_text("# Soak run (issue 12)\n\n" + "\n".join(lines)
                   + f"\n![RSS over the soak run]({PNG.name})\n")
    _plot(samples, budget_mib)
    sys.exit(0 if passed else 1)


def _spool_telemetry(spool: Path) -> tuple[int, int]:
    """(last telemetry seq the agent issued, telemetry rows still spooled)."""
    from toma_edge.device.spool import Spool

    s = Spool(spool)
    try:
        issued = s.last_seq("telemetry")
    finally:
        s.close()
    con = sqlite3.connect(str(spool))
    try:
        left = con.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'telemetry'").fetchone()[0]
    finally:
        con.close()
    return issued, int(left)


def _plot(samples: list[tuple[float, float]], budget_mib: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot([t for t, _ in samples], [m for _, m in samples], lw=1, label="serve RSS")
    ax.axhline(budget_mib, color="tab:red", ls="--", lw=1, label="budget")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_ylim(0, budget_mib * 1.1)
    ax.legend(loc="lower right")
    ax.set_title("toma-edge serve under mixed valid and hostile traffic")
    fig.tight_layout()
    fig.savefig(PNG, dpi=100)


if __name__ == "__main__":
    main()
