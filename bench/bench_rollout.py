"""Fleet rollout to 50 devices: time from deploy to all healthy against the sum of the
health windows, and the broker's traffic per device against the bundle's size.

    python bench/bench_rollout.py                         # 50 devices, 10 per process
    python bench/bench_rollout.py --devices 20 --window 3 --rate exponential:2,2

A mosquitto with the shipped config and ACL (plus ``$SYS`` read for the bench's own
``collector`` user, ``sys_interval 1``), one `toma-edge fleet collect` process, and the
devices: real :class:`toma_edge.device.service.Service` objects (the real agent, MQTT
connection, job handler, fit check, warm-up and swap, health window), several per
process on one asyncio loop, MQTT only (no HTTP, no requests: every window passes on
memory and crashes alone). Then `toma-edge fleet deploy` as a process (user `deployer`)
with the signed example bundle. Broker traffic is mosquitto's ``$SYS/broker/bytes/sent``
and ``.../received`` before and after the rollout (telemetry of the same period counted
separately from a quiet period of the same length and taken off).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from mqtt_fixtures import Broker, make_pki, password_for, start_collector, wait_until  # noqa: E402

FLEET = "bench"


def _worker(ids: list[str], root: Path, url_fmt: str, interval_s: float, trust: str) -> None:
    """Run a Service per device id on one loop until stdin closes."""
    from toma_edge.device.service import Service, ServiceConfig

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    svcs = []
    for dev in ids:
        d = root / dev
        pw = d / "pw"
        pw.write_text(password_for(dev) + "\n")
        svc = Service(ServiceConfig(
            bundle=str(d / "state" / "current"), http=None, mqtt=url_fmt.format(dev),
            device_id=dev, fleet=FLEET, budget="16GiB", threads=1,
            telemetry_interval_s=interval_s, spool=str(d / "spool.db"),
            mqtt_password_file=str(pw), trust_key=trust))
        svc.start(loop)
        svcs.append(svc)
    print("ready", flush=True)
    sys.stdin.read()
    for s in svcs:
        s.stop()


class SysBytes:
    """mosquitto's $SYS byte counters, read as the bench's collector user."""

    def __init__(self, broker: Broker) -> None:
        from toma_edge.telemetry import make_client

        self.v: dict[str, int] = {}
        self.c = make_client(broker.settings("collector-2"), client_id="collector-2")
        self.c.on_message = lambda cl, ud, m: self.v.__setitem__(m.topic.rsplit("/", 1)[1],
                                                                 int(m.payload))
        self.c.connect("127.0.0.1", broker.port)
        self.c.subscribe("$SYS/broker/bytes/+", qos=0)
        self.c.loop_start()
        wait_until(lambda: len(self.v) == 2, 15, "$SYS byte counters")

    def now(self) -> dict[str, int]:
        """The counters after their next update (sys_interval 1 s)."""
        old = dict(self.v)
        t = time.monotonic()
        while self.v == old and time.monotonic() - t < 5:
            time.sleep(0.05)
        time.sleep(1.1)  # one more update: what was in flight is counted
        return dict(self.v)


def _example_bundle() -> Path:
    out = Path(tempfile.gettempdir()) / "toma-edge-bench-rollout-example"
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "toma_edge.cli", "build", "--target", "rpi",
                        "--out", str(out)], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--per-process", type=int, default=10)
    ap.add_argument("--window", type=float, default=5.0, help="health window, seconds")
    ap.add_argument("--rate", default="exponential:2,2")
    ap.add_argument("--canary", type=int, default=1)
    ap.add_argument("--bundle", type=Path, default=None,
                    help="a bundle folder (copied, never written) [default: the built-in "
                         "example, built once into the temp folder]")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from toma_edge.bundle import make_archive, sign_manifest
    from toma_edge.host.fleet.rollout import plan_waves
    from toma_edge.host.fleet.store import open_store

    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    ids = [f"b-{i}" for i in range(args.devices)]
    users = ["collector", "collector-2", "deployer", *ids]
    broker = Broker(tmp / "broker", make_pki(tmp / "pki"), users=users)
    with open(broker.folder / "acl", "a") as f:
        f.write("\n# bench only: the byte counters\nuser collector-2\ntopic read $SYS/#\n")
    with open(broker.conf, "a") as f:
        f.write("sys_interval 1\n")
    broker.start()
    procs: list[subprocess.Popen[Any]] = []
    collector = None
    try:
        key = Ed25519PrivateKey.generate()
        priv, pub = tmp / "k.pem", tmp / "k.pub"
        priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        pub.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        v1 = tmp / "v1"
        shutil.copytree(args.bundle or _example_bundle(), v1)
        sign_manifest(v1, priv)
        v2 = tmp / "v2"
        shutil.copytree(v1, v2)
        m = json.loads((v2 / "manifest.json").read_text())
        m["version"] = "bench-v2"
        (v2 / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
        sign_manifest(v2, priv)
        archive = make_archive(v2, tmp / "v2.tar.gz")
        size = archive.stat().st_size
        for dev in ids:
            st = tmp / "devs" / dev / "state"
            (st / "releases").mkdir(parents=True)
            shutil.copytree(v1, st / "releases" / "v1")
            (st / "current").symlink_to("releases/v1")
        db = tmp / "fleet.db"
        collector = start_collector(broker, db=db, client_id="bench", log=tmp / "collect.log",
                                    user="collector")
        t_start = time.monotonic()
        url_fmt = f"mqtt://{{}}@127.0.0.1:{broker.port}"
        for i in range(0, len(ids), args.per_process):
            chunk = ids[i:i + args.per_process]
            code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import bench_rollout as b;"
                    " a = json.loads(sys.argv[2]); b._worker(a[0], b.Path(a[1]), a[2], a[3], a[4])")
            p = subprocess.Popen(
                [sys.executable, "-c", code, str(REPO / "bench"),
                 json.dumps([chunk, str(tmp / "devs"), url_fmt, 2.0, str(pub)])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(  # noqa: SIM115
                    tmp / f"worker{i}.log", "wb"), text=True)
            procs.append(p)
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"a device process failed: see {tmp}/worker*.log")
        with open_store(db) as s:
            wait_until(lambda: len(s.fleet_device_ids(FLEET)) == len(ids), 60, "all devices")
        print(f"{len(ids)} devices up in {time.monotonic() - t_start:.1f} s "
              f"({len(procs)} processes)", flush=True)
        sysb = SysBytes(broker)
        # a quiet period first: the telemetry and status traffic of the fleet alone
        q0 = sysb.now()
        t_q = time.monotonic()
        time.sleep(10)
        q1 = sysb.now()
        quiet_s = time.monotonic() - t_q
        b0 = sysb.now()
        t0 = time.monotonic()
        env = broker.env("deployer")
        r = subprocess.run(
            [sys.executable, "-m", "toma_edge.cli", "fleet", "deploy", str(archive), "--mqtt",
             broker.url("deployer"), "--fleet", FLEET, "--db", str(db), "--canary",
             str(args.canary), "--rate", args.rate, "--health-window", f"{args.window}s",
             "--timeout", "20m"], env=env, capture_output=True, text=True)
        took = time.monotonic() - t0
        b1 = sysb.now()
        span = time.monotonic() - t0
        if r.returncode != 0:
            raise SystemExit(f"deploy failed ({r.returncode}): {r.stderr[-3000:]}")
        waves = plan_waves(ids, args.canary, args.rate)
        rid = r.stdout.splitlines()[0]
        with open_store(db) as s:
            devs = s.rollout_devices(rid)
            evs = [e for e in s.rollout_events(FLEET) if rid in e["fields"]]
        per_wave: dict[int, list[float]] = {}
        healthy = {e["device_id"]: float(e["received_at"]) for e in evs
                   if e["kind"] == "rollout.healthy"}
        live = {e["device_id"]: float(e["received_at"]) for e in evs
                if e["kind"] == "rollout.live"}
        for d in devs:
            per_wave.setdefault(int(d["wave"]), []).append(
                healthy[d["device_id"]] - float(d["sent_at"]))
        to_live = [live[d["device_id"]] - float(d["sent_at"]) for d in devs]
        sent = (b1["sent"] - b0["sent"]) - (q1["sent"] - q0["sent"]) * span / quiet_s
        recv = (b1["received"] - b0["received"]) - (q1["received"] - q0["received"]) * span / quiet_s
        windows = len(waves) * args.window
        print(json.dumps({
            "devices": len(ids), "waves": [len(w) for w in waves], "window_s": args.window,
            "deploy_to_all_healthy_s": round(took, 2), "sum_of_windows_s": windows,
            "overhead_s": round(took - windows, 2),
            "per_wave_sent_to_healthy_s": {w: [round(min(v), 2), round(max(v), 2)]
                                           for w, v in sorted(per_wave.items())},
            "sent_to_live_s": [round(min(to_live), 2), round(sorted(to_live)[len(to_live) // 2], 2),
                               round(max(to_live), 2)],
            "bundle_archive_bytes": size, "chunks": math.ceil(size / (128 * 1024)),
            "broker_bytes_received_per_device": round(recv / len(ids)),
            "broker_bytes_sent_per_device": round(sent / len(ids)),
            "sent_per_device_over_bundle": round(sent / len(ids) / size, 2),
            "quiet_traffic_bytes_per_s": round((q1["sent"] - q0["sent"]) / quiet_s),
        }, indent=1))
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        if collector is not None:
            collector.terminate()
            collector.wait(20)
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
