"""Benchmark of `toma-edge serve` on loopback: correctness under load, throughput vs a bare
endpoint, micro-batching on a heavier model, telemetry's cost.

    python bench/bench_service.py                      # all parts, writes bench/results/service.md
    python bench/bench_service.py --only load          # one part: load | wrk | heavy | telemetry

Parts (each server is a separate process on 127.0.0.1, measured side by side in one run):

- load: 64 concurrent keep-alive clients send 20,000 requests (1-4 rows each); every
  answer is compared with the Predictor run offline on that request's rows alone; a good
  bundle is POSTed to /v1/model at 1/3 of the run and a corrupt one at 2/3; the service's
  whole-process peak RSS (VmHWM) is read at the end and compared with the budget.
- wrk: wrk -c64 against the full service and against a bare Starlette endpoint on the
  same uvicorn stack that only parses JSON and calls the model.
- heavy: a wider fp32 MLP (exported here through toma_edge.host.export.export_program)
  whose batch-1 call takes >= 1 ms: the service with micro-batching vs one request per
  model call (max_batch_rows=1).
- telemetry: the full service with the telemetry agent on (mosquitto on loopback, 1 s
  windows) vs off, alternating runs.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
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
from bundle_tools import corrupt, with_version  # noqa: E402
from mqtt_fixtures import free_port  # noqa: E402

from toma_edge.probes import peak_rss_of  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "toma-edge-bench-service"
OUT = REPO / "bench" / "results" / "service.md"
TOKEN = "bench-admin-token-0123456789abcdef"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


# -- servers ----------------------------------------------------------------------------
def _serve_main(argv: list[str]) -> None:
    """In-process server for one bench row: full (the real service) or bare."""
    mode, bundle, port = argv[0], argv[1], int(argv[2])
    extra = json.loads(argv[3]) if len(argv) > 3 else {}
    if mode == "bare":
        import uvicorn

        from toma_edge.device.predictor import Predictor
        from toma_edge.device.service.http_app import make_bare_app

        p = Predictor(bundle, threads=1)
        uvicorn.run(make_bare_app(p), host="127.0.0.1", port=port, loop="uvloop",
                    http="httptools", access_log=False, log_level="warning")
        return
    from toma_edge.device.service import ServiceConfig, serve

    sys.exit(serve(ServiceConfig(bundle=bundle, http=f"127.0.0.1:{port}", threads=1, **extra)))


class Server:
    def __init__(self, mode: str, bundle: Path, extra: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = WORK / f"serve-{mode}-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "_serve", mode, str(bundle), str(self.port),
             json.dumps(extra or {})], stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
            env=env or ENV)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{mode} server exited: {self.log.read_text()[-2000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("POST", "/v1/predict", body=b'{"inputs": []}',
                          headers={"Content-Type": "application/json"})
                c.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def peak_rss(self) -> int:
        return peak_rss_of(self.proc.pid)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


# -- wrk --------------------------------------------------------------------------------
def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v


def wrk(port: int, body: str, seconds: int, conns: int = 64) -> dict[str, float]:
    script = WORK / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = '{body}'\n")
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(script),
           f"http://127.0.0.1:{port}/v1/predict"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"\s50%\s+(\S+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors:.*", out)
    return {"rps": rps, "p50_ms": _ms(p50.group(1)) if p50 else float("nan"),
            "p99_ms": _ms(p99.group(1)) if p99 else float("nan"),
            "non2xx": float(bad.group(1)) if bad else 0.0,
            "socket_errors": 0.0 if not errs else float(sum(map(int, re.findall(r"\d+", errs.group(0)))))}


def row_fmt(name: str, r: dict[str, float]) -> str:
    return (f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{int(r['non2xx'])} |")


# -- bundles ----------------------------------------------------------------------------
def example_bundle() -> Path:
    d = WORK / "rpi4"
    if not (d / "manifest.json").exists():
        from toma_edge.host import build

        build(target="rpi", out=d)
    return d


def heavy_bundle(base: Path, width: int) -> Path:
    """The example's bundle with a wider fp32 MLP (10 -> width -> width -> 1) in it."""
    d = WORK / f"wide-{width}"
    if (d / "manifest.json").exists():
        return d
    import torch

    from toma_edge.host.export import export_program
    from toma_edge.host.measure import measure_peaks

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.ReLU(),
                              torch.nn.Linear(width, width), torch.nn.ReLU(),
                              torch.nn.Linear(width, 1))
    m = json.loads((base / "manifest.json").read_text())
    res = export_program(net, torch.zeros(2, 10), max_batch=int(m["max_batch"]), quantize="fp32")
    tmp = WORK / f".wide-{width}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "model.pte").write_bytes(res.pte)
    meas = measure_peaks(tmp / "model.pte", int(m["max_batch"]))
    m.update(name=f"wide-mlp-{width}", shipped="fp32",
             compression={"quantization": "fp32", "prune": 0.0})
    m["memory"].update(pte_bytes=len(res.pte), planned_bytes=res.planned_bytes,
                       measured_peak_bytes={k: int(v) for k, v in meas["measured_peak_bytes"].items()})
    m["files"] = {"model.pte": {"sha256": hashlib.sha256(res.pte).hexdigest(), "bytes": len(res.pte)}}
    (tmp / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    tmp.rename(d)
    return d


def batch1_ms(bundle: Path) -> float:
    from toma_edge.device.predictor import Predictor

    p = Predictor(bundle, threads=1, budget="16GiB")
    x = np.random.default_rng(0).normal(size=(1, 10)).astype(np.float32)
    for _ in range(20):
        p.predict(x)
    t = time.perf_counter()
    for _ in range(200):
        p.predict(x)
    return (time.perf_counter() - t) / 200 * 1000


# -- load test --------------------------------------------------------------------------
def load_test(bundle: Path, n_requests: int = 20_000, clients: int = 64) -> list[str]:
    from toma_edge.bundle import make_archive
    from toma_edge.device.predictor import Predictor

    rel = WORK / "releases"
    rel.mkdir(exist_ok=True)
    v1 = with_version(bundle, rel / "v1", "load-v1")
    v2 = with_version(bundle, rel / "v2", "load-v2")
    good = make_archive(v2, WORK / "v2.tar.gz")
    bad_dir = corrupt(with_version(bundle, rel / "bad-src", "load-bad"), rel / "bad")
    bad = make_archive(bad_dir, WORK / "bad.tar.gz")
    (WORK / "token").write_text(TOKEN)
    (WORK / "token").chmod(0o600)

    rng = np.random.default_rng(1)
    reqs = [rng.normal(size=(int(rng.integers(1, 5)), 10)).astype(np.float32)
            for _ in range(n_requests)]
    p = Predictor(v1, threads=1, budget="16GiB")
    want = [p.predict(r).outputs for r in reqs]
    bodies = [json.dumps({"inputs": r.tolist()}).encode() for r in reqs]

    srv = Server("full", v1, {"admin_token_file": str(WORK / "token")})
    budget = json.loads((v1 / "manifest.json").read_text())["target"]["memory_budget_bytes"]
    stats = {"ok": 0, "wrong": 0, "overload": 0, "other": 0, "lost": 0}
    lat: list[float] = []
    lock = threading.Lock()
    nxt = iter(range(n_requests))
    swaps: list[str] = []

    def client() -> None:
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                c.close()
                return
            t = time.perf_counter()
            try:
                c.request("POST", "/v1/predict", bodies[i], {"Content-Type": "application/json"})
                r = c.getresponse()
                body = r.read()
            except (OSError, http.client.HTTPException):
                with lock:
                    stats["lost"] += 1
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
                continue
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
                if r.status == 200:
                    got = np.array(json.loads(body)["outputs"], dtype=np.float32)
                    ok = got.shape == want[i].shape and np.allclose(got, want[i], atol=1e-5, rtol=0)
                    stats["ok" if ok else "wrong"] += 1
                elif r.status == 503 and r.getheader("Retry-After"):
                    stats["overload"] += 1
                else:
                    stats["other"] += 1
            if i in (n_requests // 3, 2 * n_requests // 3):
                threading.Thread(target=post_model, args=(good if i == n_requests // 3 else bad,)).start()

    def post_model(path: Path) -> None:
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
        c.request("POST", "/v1/model", path.read_bytes(),
                  {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/gzip"})
        r = c.getresponse()
        swaps.append(f"{path.name}: HTTP {r.status} {r.read()[:160].decode(errors='replace')}")

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(1.0)
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    c.request("GET", "/healthz")
    health = json.loads(c.getresponse().read())
    peak = srv.peak_rss()
    rc = srv.stop()
    lat.sort()
    answered = sum(stats.values()) - stats["lost"]
    lines = [
        "## Load test: 64 concurrent clients, 20,000 requests, answers checked",
        "",
        "`python bench/bench_service.py --only load` (64 Python keep-alive clients in the bench "
        "process; 1-4 rows per request; each answer compared with `Predictor.predict` of that "
        "request's rows alone, atol 1e-5)",
        "",
        "| requests | answered | right | wrong | overload 503 | other errors | lost | wall s | req/s | p50 ms | p99 ms | peak RSS (VmHWM) | budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {n_requests} | {answered} | {stats['ok']} | {stats['wrong']} | {stats['overload']} | "
        f"{stats['other']} | {stats['lost']} | {wall:.1f} | {n_requests / wall:.0f} | "
        f"{lat[len(lat) // 2] * 1000:.2f} | {lat[int(len(lat) * 0.99)] * 1000:.2f} | "
        f"{peak / 2**20:.1f} MiB | {budget / 2**20:.0f} MiB |",
        "",
        "Model updates posted during the run (good at 1/3, corrupt at 2/3):",
        "",
        *[f"- {s}" for s in swaps],
        f"- serving at the end: {health['model']['name']} {health['model']['version']}",
        f"- service exit code after SIGTERM: {rc}",
        "",
    ]
    print("\n".join(lines), flush=True)
    return lines


# -- throughput -------------------------------------------------------------------------
def body_for(rows: int = 1) -> str:
    rng = np.random.default_rng(2)
    return json.dumps({"inputs": rng.normal(size=(rows, 10)).round(4).tolist()})


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def interleaved(servers: dict[str, Server], seconds: int, rounds: int,
                tag: str) -> dict[str, list[dict[str, float]]]:
    """wrk against every server in turn, ``rounds`` times, the order reversed every other
    round (ABBA...): both servers stay up the whole time, so a slow spell of the shared
    machine hits both sides alike and each round's ratio compares neighbours in time."""
    body = body_for()
    for s in servers.values():
        wrk(s.port, body, 2)  # warm-up
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in servers}
    names = list(servers)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            runs[k].append(wrk(servers[k].port, body, seconds))
            print(tag, r, k, runs[k][-1], flush=True)
    return runs


def med(runs: list[dict[str, float]], f: str) -> float:
    return statistics.median(x[f] for x in runs)


def table(runs: dict[str, list[dict[str, float]]]) -> list[str]:
    out = ["| server | req/s (median) | p50 ms (median) | p99 ms (median) | p99 ms (worst) | "
           "non-2xx | req/s of each round |", "|---|---|---|---|---|---|---|"]
    for k, rs in runs.items():
        out.append(f"| {k} | {med(rs, 'rps'):.0f} | {med(rs, 'p50_ms'):.2f} | "
                   f"{med(rs, 'p99_ms'):.2f} | {max(x['p99_ms'] for x in rs):.2f} | "
                   f"{int(sum(x['non2xx'] + x['socket_errors'] for x in rs))} | "
                   f"{', '.join(str(round(x['rps'])) for x in rs)} |")
    return out


def ratios(num: list[dict[str, float]], den: list[dict[str, float]]) -> list[float]:
    return [a["rps"] / b["rps"] for a, b in zip(num, den, strict=True)]


def spread(rs: list[float], fmt: str = "{:.2f}") -> str:
    return (f"median **{fmt.format(statistics.median(rs))}**, rounds "
            f"{', '.join(fmt.format(x) for x in rs)} (min {fmt.format(min(rs))}, "
            f"max {fmt.format(max(rs))})")


def throughput(bundle: Path, seconds: int, rounds: int) -> list[str]:
    before = loadavg()
    bare_name, full_name = "bare endpoint (parse JSON, call model)", "full service"
    servers = {bare_name: Server("bare", bundle), full_name: Server("full", bundle)}
    try:
        runs = interleaved(servers, seconds, rounds, "wrk")
    finally:
        for s in servers.values():
            s.stop()
    r = ratios(runs[full_name], runs[bare_name])
    return [
        "## Throughput: full service vs a bare endpoint, same stack (uvicorn + uvloop + httptools, Starlette)",
        "",
        f"`python bench/bench_service.py --only wrk --rounds {rounds}` (wrk -t2 -c64 -d{seconds}s "
        f"per run, {rounds} rounds alternating ABBA, both servers up throughout; one 10-value row "
        "per request, built-in example int8 bundle, threads=1; load average before "
        f"{before}, after {loadavg()})",
        "",
        *table(runs),
        "",
        f"full / bare per round: {spread(r)} (target >= 0.80)",
        "",
    ]


def pick_heavy(base: Path, widths: tuple[int, ...]) -> tuple[Path, int, float]:
    """The first width whose batch-1 call takes >= 1 ms here (the issue's 'heavier model')."""
    for w in widths:
        b = heavy_bundle(base, w)
        ms = batch1_ms(b)
        print(f"heavy: width {w}: batch-1 call {ms:.3f} ms", flush=True)
        if ms >= 1.0:
            break
    return b, w, ms


def heavy(base: Path, seconds: int, rounds: int, widths: tuple[int, ...]) -> list[str]:
    before = loadavg()
    b, width, ms = pick_heavy(base, widths)
    one_name, mb_name = "one request per model call (max_batch_rows=1)", "micro-batching (default)"
    servers = {one_name: Server("full", b, {"max_batch_rows": 1}), mb_name: Server("full", b)}
    try:
        runs = interleaved(servers, seconds, rounds, "heavy")
    finally:
        for s in servers.values():
            s.stop()
    ms_after = batch1_ms(b)
    r = ratios(runs[mb_name], runs[one_name])
    return [
        f"## Micro-batching on a heavier model (fp32 MLP 10-{width}-{width}-1)",
        "",
        f"Batch-1 model call (`Predictor.predict` of one row, threads=1, mean of 200 after 20 "
        f"warm-up calls): **{ms:.2f} ms** before the runs, {ms_after:.2f} ms after (target "
        ">= 1 ms; the bench takes the first width of "
        f"{', '.join(map(str, widths))} that reaches it).",
        "",
        f"`python bench/bench_service.py --only heavy --rounds {rounds}` (wrk -t2 -c64 "
        f"-d{seconds}s per run, {rounds} rounds alternating ABBA, both servers up throughout, "
        f"the full service both times; load average before {before}, after {loadavg()})",
        "",
        *table(runs),
        "",
        f"micro-batching / one per call per round: {spread(r)}x (target >= 3x)",
        "",
    ]


def telemetry_cost(bundle: Path, seconds: int, rounds: int) -> list[str]:
    before = loadavg()
    d = WORK / "mosquitto"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    port = free_port()
    (d / "m.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(d / "m.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    on = {"mqtt": f"mqtt://127.0.0.1:{port}", "device_id": "bench-1", "fleet": "bench",
          "telemetry_interval_s": 1.0, "spool": str(d / "spool.db")}
    servers: dict[str, Server] = {}
    try:
        servers["agent off"] = Server("full", bundle)
        servers["agent on"] = Server("full", bundle, on)
        runs = interleaved(servers, seconds, rounds, "telemetry")
    finally:
        for s in servers.values():
            s.stop()
        broker.terminate()
        broker.wait()
    r = [1 - x for x in ratios(runs["agent on"], runs["agent off"])]
    return [
        "## Telemetry agent's cost on throughput",
        "",
        f"`python bench/bench_service.py --only telemetry --rounds {rounds}` (wrk -t2 -c64 "
        f"-d{seconds}s per run, {rounds} rounds alternating ABBA, both services up throughout; "
        "agent on = --mqtt to mosquitto on loopback, 1 s telemetry windows, spool on disk; "
        f"load average before {before}, after {loadavg()})",
        "",
        *table(runs),
        "",
        "cost = 1 - on/off per round: " + spread([x * 100 for x in r], "{:.1f}%")
        + " (target <= 2%)",
        "",
    ]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def wait_quiet(limit: float, max_wait_s: float = 600.0) -> str:
    """Wait (checking every 30 s, at most ``max_wait_s``) for the 1-minute load average to
    fall below ``limit``; returns what it was when the bench started."""
    deadline = time.monotonic() + max_wait_s
    while float(loadavg().split()[0]) >= limit and time.monotonic() < deadline:
        print(f"load average {loadavg()}: waiting for < {limit}", flush=True)
        time.sleep(30)
    return loadavg()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["load", "wrk", "heavy", "telemetry"], action="append")
    ap.add_argument("--seconds", type=int, default=5, help="wrk run length, seconds")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--widths", default="2048,2560,3072,4096",
                    help="hidden widths of the heavier MLP to try, first with a >= 1 ms call wins")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds per comparison")
    ap.add_argument("--wait-load", type=float, default=2.0,
                    help="wait up to 10 min for the 1-minute load average to be below this")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    parts = a.only or ["load", "wrk", "heavy", "telemetry"]
    bundle = example_bundle()
    load = wait_quiet(a.wait_load)
    lines = ["# Inference service (`toma-edge serve`)", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu_model()}) shared with other work, "
             f"loopback only; load average (1/5/15 min) when the bench began: {load}; "
             f"Python {sys.version.split()[0]}; server: uvicorn + uvloop + httptools, Starlette; "
             "service threads=1. Generated by `bench/bench_service.py`.", ""]
    if "load" in parts:
        lines += load_test(bundle, a.requests)
    if "wrk" in parts:
        lines += throughput(bundle, a.seconds, a.rounds)
    if "heavy" in parts:
        lines += heavy(bundle, a.seconds, a.rounds, tuple(int(w) for w in a.widths.split(",")))
    if "telemetry" in parts:
        lines += telemetry_cost(bundle, a.seconds, a.rounds)
    text = "\n".join(lines) + "\n"
    if a.out.exists() and a.only:
        text = a.out.read_text().rstrip() + "\n\n" + "\n".join(lines[4:]) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        _serve_main(sys.argv[2:])
    else:
        main()
