"""Native adapter against the torch-based pybindings path and plain ``executorch.runtime``.

    toma-edge build --target rpi --out /tmp/nb/ex
    python bench/bench_native.py /tmp/nb/ex --work /tmp/nb        # all sections
    python bench/bench_native.py /tmp/nb/ex --only start,predict  # some
    # prints markdown tables; results from this machine: bench/results/native.md

Sections, each run side by side in this one script, rounds interleaved between the
contenders because this machine is shared:

- ``start``: process start to first prediction, and the process's peak RSS (VmHWM).
- ``run``: ``toma-edge run`` on a one-row .npy, process start to the answer written
  (wall time seen by the parent) and the child's peak RSS.
- ``predict``: ``Predictor.predict()`` throughput at batch 1, 32 and 256, both adapters in
  one process.
- ``serve``: peak RSS of ``toma-edge serve`` under a few hundred HTTP requests.
- ``footprint``: the plain (device) install in a fresh venv: our packages and every
  third-party dependency with its installed size.

The process start is ``toma_edge.probes.process_start_time()`` (/proc: starttime against
uptime, ~10 ms), not psutil's create_time(), whose boot time is whole seconds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from mqtt_fixtures import free_port  # noqa: E402

from toma_edge.probes import peak_rss_of  # noqa: E402

MiB = 1 << 20

# toma_edge.probes imports only the standard library: the same start-up for every child
_START = r"""
from toma_edge.probes import peak_rss_of, process_start_time
T0 = process_start_time()
"""

CHILD_OURS = _START + r"""
import json, sys, time
import numpy as np
from toma_edge.device.predictor import Predictor
p = Predictor(sys.argv[1], threads=1, budget="4GiB", adapter=sys.argv[2])
width = p.input_spec.row_shape
y = p.predict(np.full((1, *width), 0.5, np.float32)).outputs
first = time.time() - T0
print(json.dumps({"first_s": first, "hwm": peak_rss_of(), "y": float(y.ravel()[0]),
                  "adapter": p.bundle.adapter, "torch": "torch" in sys.modules}))
"""

CHILD_RUNTIME = _START + r"""
import json, sys, time
import torch
from executorch.runtime import Runtime
prog = Runtime.get().load_program(sys.argv[1] + "/model.pte")
m = prog.load_method("forward")
width = json.load(open(sys.argv[1] + "/manifest.json"))["inputs"][0]["shape"][1:]
y = m.execute([torch.full((1, *width), 0.5)])[0]
first = time.time() - T0
print(json.dumps({"first_s": first, "hwm": peak_rss_of(), "y": float(y.reshape(-1)[0]),
                  "adapter": "executorch.runtime", "torch": True}))
"""

# what `toma-edge run` does for one row, written with executorch.runtime
RUN_RUNTIME = r"""
import sys, numpy as np, torch
from executorch.runtime import Runtime
m = Runtime.get().load_program(sys.argv[1] + "/model.pte").load_method("forward")
x = np.load(sys.argv[2])
np.save(sys.argv[3], m.execute([torch.from_numpy(x)])[0].numpy())
"""


def _env(adapter: str | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TOMA_EDGE_ADAPTER", None)
    if adapter:
        env["TOMA_EDGE_ADAPTER"] = adapter
    return env


def _child(code: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       timeout=300, env=_env(), cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_start(bundle: Path, rounds: int) -> list[str]:
    runs: dict[str, list[dict]] = {"native": [], "pybind": [], "executorch.runtime": []}
    for _ in range(rounds):
        runs["native"].append(_child(CHILD_OURS, str(bundle), "native"))
        runs["pybind"].append(_child(CHILD_OURS, str(bundle), "pybind"))
        runs["executorch.runtime"].append(_child(CHILD_RUNTIME, str(bundle)))
    ys = {k: v[0]["y"] for k, v in runs.items()}
    assert max(ys.values()) - min(ys.values()) < 1e-5, ys
    assert not runs["native"][0]["torch"] and runs["native"][0]["adapter"] == "native"
    nat_s = _med([r["first_s"] for r in runs["native"]])
    nat_m = _med([r["hwm"] for r in runs["native"]])
    out = [f"### Cold start: process start to first prediction ({rounds} rounds, median)", "",
           "| path | torch imported | start to first prediction | peak RSS | vs native (time, RSS) |",
           "|---|---|---|---|---|"]
    for k, v in runs.items():
        s, m = _med([r["first_s"] for r in v]), _med([r["hwm"] for r in v])
        out.append(f"| {k} | {'yes' if v[0]['torch'] else 'no'} | {s:.3f} s | {m / MiB:.1f} MiB | "
                   f"{s / nat_s:.2f}x, +{(m - nat_m) / MiB:.0f} MiB |")
    return out + [""]


def _timed_run(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd="/")
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd}: exit {p.returncode}: {p.stderr.read().decode()[-1000:] if p.stderr else ''}")
    return wall, ru.ru_maxrss * 1024


def bench_run(bundle: Path, work: Path, rounds: int) -> list[str]:
    width = json.loads((bundle / "manifest.json").read_text())["inputs"][0]["shape"][1:]
    one = work / "one.npy"
    np.save(one, np.full((1, *width), 0.5, np.float32))
    cli = [sys.executable, "-m", "toma_edge.cli", "run", str(bundle), "-i", str(one), "-o"]
    contenders = {
        "native (`toma-edge run`)": (lambda: cli + [str(work / "o1.npy")], _env("native")),
        "pybind (`toma-edge run`)": (lambda: cli + [str(work / "o2.npy")], _env("pybind")),
        "executorch.runtime (script)": (lambda: [sys.executable, "-c", RUN_RUNTIME, str(bundle),
                                                 str(one), str(work / "o3.npy")], _env()),
    }
    res: dict[str, list[tuple[float, int]]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, (cmd, env) in contenders.items():
            res[k].append(_timed_run(cmd(), {**env, "PYTHONPATH": str(REPO)}))
    outs = [np.load(work / f"o{i}.npy") for i in (1, 2, 3)]
    assert all(np.array_equal(outs[0].reshape(-1), o.reshape(-1)) for o in outs[1:]), outs
    nat = _med([w for w, _ in res["native (`toma-edge run`)"]])
    out = [f"### `toma-edge run` on a one-row .npy: process start to the answer written ({rounds} rounds, median)", "",
           "| path | wall | peak RSS | vs native |", "|---|---|---|---|"]
    for k, v in res.items():
        w, m = _med([a for a, _ in v]), _med([b for _, b in v])
        out.append(f"| {k} | {w:.3f} s | {m / MiB:.1f} MiB | {w / nat:.2f}x |")
    return out + [""]


def bench_predict(bundle: Path, rounds: int) -> list[str]:
    os.environ.pop("TOMA_EDGE_ADAPTER", None)
    from toma_edge.device.predictor import Predictor

    preds = {a: Predictor(bundle, threads=1, budget="4GiB", adapter=a) for a in ("native", "pybind")}
    width = preds["native"].input_spec.row_shape
    out = [f"### Predictor.predict() throughput, one process, 1 thread ({rounds} rounds, median)", "",
           "| batch | native rows/s | pybind rows/s | native / pybind |", "|---|---|---|---|"]
    for batch in (1, 32, 256):
        x = np.random.default_rng(batch).standard_normal((batch, *width)).astype(np.float32)
        np.testing.assert_array_equal(preds["native"].predict(x).outputs, preds["pybind"].predict(x).outputs)
        calls = max(20, 40_000 // batch)
        rates: dict[str, list[float]] = {a: [] for a in preds}
        for _ in range(rounds):
            for a, p in preds.items():
                t = time.perf_counter()
                for _ in range(calls):
                    p.predict(x)
                rates[a].append(calls * batch / (time.perf_counter() - t))
        n, b = _med(rates["native"]), _med(rates["pybind"])
        ratio = _med([x / y for x, y in zip(rates["native"], rates["pybind"], strict=True)])
        out.append(f"| {batch} | {n:,.0f} | {b:,.0f} | {ratio:.2f}x |")
    return out + [""]


def _serve_once(bundle: Path, adapter: str, requests: int, python: str) -> tuple[int, float]:
    port = free_port()
    p = subprocess.Popen([python, "-m", "toma_edge.cli", "serve", str(bundle), "--http",
                          f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=_env(adapter), cwd="/")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.05)
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError(f"serve ({adapter}) did not start")
        width = json.loads((bundle / "manifest.json").read_text())["inputs"][0]["shape"][1:]
        rng = np.random.default_rng(0)
        bodies = [json.dumps({"inputs": rng.standard_normal((int(n), *width)).round(4).tolist()}).encode()
                  for n in rng.integers(1, 65, size=requests)]
        errors = []

        def client(part: list[bytes]) -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for b in part:
                c.request("POST", "/v1/predict", body=b, headers={"Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(r.status)
            c.close()

        t = time.perf_counter()
        threads = [threading.Thread(target=client, args=(bodies[i::8],)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        secs = time.perf_counter() - t
        if errors:
            raise RuntimeError(f"serve ({adapter}): {len(errors)} failed requests")
        return peak_rss_of(p.pid), requests / secs
    finally:
        p.terminate()
        p.wait(30)


def bench_serve(bundle: Path, rounds: int, requests: int, lean_python: str | None) -> list[str]:
    contenders = {"native": (sys.executable, "native"), "pybind": (sys.executable, "pybind")}
    if lean_python:
        contenders = {"native, plain install (no torch)": (lean_python, "native"), **contenders}
    res: dict[str, list[tuple[int, float]]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, (py, a) in contenders.items():
            res[k].append(_serve_once(bundle, a, requests, py))
    out = [f"### `toma-edge serve`: peak RSS under {requests} HTTP requests (1-64 rows each, 8 clients; {rounds} rounds, median)", "",
           "| service | peak RSS | requests/s |", "|---|---|---|"]
    for k, v in res.items():
        out.append(f"| {k} | {_med([m for m, _ in v]) / MiB:.1f} MiB | {_med([r for _, r in v]):,.0f} |")
    return out + [""]


def make_lean_venv(work: Path) -> Path:
    """A fresh venv with the plain install from this tree (toma-edge-native built here)."""
    venv = work / "lean-venv"
    py = venv / "bin" / "python"
    if py.exists():
        return py
    wheels = work / "native-wheel"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO / "device" / "native")], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--find-links", str(wheels), str(REPO)], check=True)
    return py


_SIZES = r"""
import json, importlib.metadata as md, os
out = {}
for d in md.distributions():
    total = 0
    for f in d.files or []:
        p = d.locate_file(f)
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    out[d.metadata["Name"]] = total
print(json.dumps(out))
"""


def bench_footprint(lean_python: str) -> list[str]:
    sizes: dict[str, int] = json.loads(subprocess.run([lean_python, "-c", _SIZES], capture_output=True,
                                                      text=True, check=True).stdout)
    ours = {k: v for k, v in sizes.items() if k.lower() in ("toma-edge", "toma-edge-native")}
    tooling = {"pip", "setuptools", "wheel"}
    third = {k: v for k, v in sizes.items() if k not in ours and k.lower() not in tooling}
    out = ["### Installed footprint of the plain (device) install, fresh venv", "",
           f"Our own packages: **{sum(ours.values()) / MiB:.1f} MiB** "
           f"({', '.join(f'{k} {v / MiB:.1f} MiB' for k, v in sorted(ours.items()))}); "
           f"third-party: {sum(third.values()) / MiB:.1f} MiB.", "",
           "| third-party package | installed size |", "|---|---|"]
    out += [f"| {k} | {v / MiB:.1f} MiB |" for k, v in sorted(third.items(), key=lambda kv: -kv[1])]
    return out + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/toma-bench-native"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--only", default="start,run,predict,serve,footprint")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(","))
    lean = str(make_lean_venv(a.work)) if only & {"serve", "footprint"} else None
    lines = [f"bench_native on {os.cpu_count()} cores, bundle {a.bundle}", ""]
    if "start" in only:
        lines += bench_start(a.bundle, a.rounds)
    if "run" in only:
        lines += bench_run(a.bundle, a.work, a.rounds)
    if "predict" in only:
        lines += bench_predict(a.bundle, a.rounds)
    if "serve" in only:
        lines += bench_serve(a.bundle, max(1, a.rounds // 2), a.requests, lean)
    if "footprint" in only and lean:
        lines += bench_footprint(lean)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
