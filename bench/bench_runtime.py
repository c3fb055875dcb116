"""Device runtime bench: cold start, baseline RSS, predict() against the raw ExecuTorch
method and ONNX Runtime, streaming throughput, peak RSS against the input size.

    pip install onnxruntime onnx          # optional: the ONNX Runtime column (skipped without)
    toma-edge build --target rpi --out /tmp/rt/ex
    python bench/bench_runtime.py /tmp/rt/ex --rows 2000000 --work /tmp/rt
    python bench/bench_runtime.py /tmp/rt/ex --only start      # one section
    # prints markdown tables; results from this machine: bench/results/runtime.md

Big inputs are generated in ``--work`` (never committed). Each timing is the best of
``--repeat`` runs, interleaved between contenders, because this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MiB = 1 << 20

_CHILD_OURS = r"""
import time, os, sys, json, psutil
t0 = psutil.Process().create_time()
import numpy as np
from toma_edge.device.predictor import Predictor
p = Predictor(sys.argv[1], threads=1, budget="4GiB")
loaded = time.time() - t0
rss_loaded = p.baseline_bytes
y = p.predict(np.full((1, 10), 0.5, np.float32)).outputs
first = time.time() - t0
print(json.dumps({"loaded_s": loaded, "first_s": first, "rss_loaded": rss_loaded,
                  "rss_first": int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'),
                  "y": float(y[0, 0])}))
"""

_CHILD_RUNTIME = r"""
import time, os, sys, json, psutil
t0 = psutil.Process().create_time()
import torch
from executorch.runtime import Runtime
rt = Runtime.get()
prog = rt.load_program(sys.argv[1] + "/model.pte")
m = prog.load_method("forward")
loaded = time.time() - t0
rss_loaded = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
y = m.execute([torch.full((1, 10), 0.5)])[0]
first = time.time() - t0
print(json.dumps({"loaded_s": loaded, "first_s": first, "rss_loaded": rss_loaded,
                  "rss_first": int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'),
                  "y": float(y[0, 0])}))
"""


def _child(code: str, bundle: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True,
                       env=env, timeout=300)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_start(bundle: Path, repeat: int) -> list[str]:
    ours, plain = [], []
    for _ in range(repeat):  # interleaved: the machine is shared
        ours.append(_child(_CHILD_OURS, bundle))
        plain.append(_child(_CHILD_RUNTIME, bundle))
    assert abs(ours[0]["y"] - plain[0]["y"]) < 1e-5
    # the device process itself: `toma-edge run` over one CSV row (pandas loaded too)
    run_base = []
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "one.csv").write_text(",".join(["0.5"] * 10) + "\n")
        for _ in range(repeat):
            p = subprocess.run(["toma-edge", "run", str(bundle), "--input", f"{d}/one.csv",
                                "--output", f"{d}/o.csv", "--threads", "1"],
                               capture_output=True, text=True, timeout=300)
            s = _summary(p.stderr)
            run_base.append((s["baseline"], s["startup"], s["peak"]))

    def med(xs: list[dict], k: str) -> float:
        return statistics.median(x[k] for x in xs)

    lines = [
        "| path | load (process start to program loaded) | cold start (to first prediction) | RSS loaded | RSS after first prediction |",
        "|---|---|---|---|---|",
    ]
    for name, xs in (("toma_edge.device (pybind adapter)", ours), ("plain executorch.runtime", plain)):
        lines.append(f"| {name} | {med(xs, 'loaded_s'):.2f} s | {med(xs, 'first_s'):.2f} s | "
                     f"{med(xs, 'rss_loaded') / MiB:.1f} MiB | {med(xs, 'rss_first') / MiB:.1f} MiB |")
    lines.append(f"| ratio / saving | | {med(plain, 'first_s') / med(ours, 'first_s'):.2f}x faster | "
                 f"{(med(plain, 'rss_loaded') - med(ours, 'rss_loaded')) / MiB:.0f} MiB less | "
                 f"{(med(plain, 'rss_first') - med(ours, 'rss_first')) / MiB:.0f} MiB less |")
    b = max(x[0] for x in run_base)
    lines.append("")
    lines.append(f"`toma-edge run` (CSV input, pandas loaded) baseline RSS at model loaded: max "
                 f"{b / MiB:.1f} MiB over {repeat} runs (medians: start-up "
                 f"{statistics.median(x[1] for x in run_base):.2f} s, whole-run peak "
                 f"{statistics.median(x[2] for x in run_base) / MiB:.1f} MiB); "
                 f"firmware_configs baseline_rss_bytes.pybind = {-(-b // MiB)}MiB")
    return lines


def _summary(stderr: str) -> dict:
    """Parse the closing summary of `toma-edge run` (numbers in bytes, seconds)."""
    import re

    def size(txt: str) -> int:
        v, u = txt.split()
        return int(float(v) * {"B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}[u])

    m = re.search(r"rows ([\d,]+) in ([\d.]+) s \(([\d,]+) rows/s; start-up ([\d.]+) s\)", stderr)
    n = re.search(r"peak RSS ([\d.]+ \w+) of the ([\d.]+ \w+) budget.*baseline ([\d.]+ \w+)", stderr)
    if not m or not n:
        raise RuntimeError(f"no summary in: {stderr[-1500:]}")
    return {"rows": int(m.group(1).replace(",", "")), "seconds": float(m.group(2)),
            "rows_per_s": float(m.group(3).replace(",", "")), "startup": float(m.group(4)),
            "peak": size(n.group(1)), "budget": size(n.group(2)), "baseline": size(n.group(3))}


def bench_predict(bundle: Path, repeat: int, rows: int = 100_000) -> list[str]:
    import torch

    from toma_edge.device.predictor import Predictor

    p = Predictor(bundle, threads=1, budget="8GiB")
    mod = p.program._module  # the loaded ExecuTorch method, called directly
    X = np.random.default_rng(0).random((rows, 10), dtype=np.float32)
    ort = _ort_session()
    lines = ["| batch | raw ExecuTorch method | Predictor.predict() | predict / raw | ONNX Runtime session.run (fp32) | ONNX Runtime (int8 dynamic) | predict / ORT fp32 |",
             "|---|---|---|---|---|---|---|"]
    for b in (1, 32, 256):
        n = rows if b > 1 else rows // 10
        xs = [torch.from_numpy(X[i:i + b]) for i in range(0, n, b)]
        p._policy.size = b  # the batch under test (the Predictor would choose 256)
        p._policy.max_size = b
        t_raw: list[float] = []
        t_pred: list[float] = []
        t_ort: list[float] = []
        t_ortq: list[float] = []
        for _ in range(repeat):
            t = time.perf_counter()
            for x in xs:
                mod.forward((x,))
            t_raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            p.predict(X[:n])
            t_pred.append(time.perf_counter() - t)
            for sess, acc in ((ort[0], t_ort), (ort[1], t_ortq)) if ort else ():
                name = sess.get_inputs()[0].name
                t = time.perf_counter()
                for i in range(0, n, b):
                    sess.run(None, {name: X[i:i + b]})
                acc.append(time.perf_counter() - t)
        raw, pr = n / min(t_raw), n / min(t_pred)
        o = n / min(t_ort) if t_ort else float("nan")
        oq = n / min(t_ortq) if t_ortq else float("nan")
        lines.append(f"| {b} | {raw:,.0f} rows/s | {pr:,.0f} rows/s | {pr / raw:.0%} | "
                     + (f"{o:,.0f} rows/s | {oq:,.0f} rows/s | {pr / o:.2f}x |" if ort else "not installed | | |"))
    p._policy.max_size = p.manifest.max_batch
    return lines


def _ort_session():  # type: ignore[no-untyped-def]
    """ONNX Runtime sessions over the same architecture (fp32 and int8 dynamic); None if absent."""
    try:
        import onnxruntime as ort
        import torch
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return None
    from toma_edge.host.example import ExampleRegressor

    d = Path(tempfile.mkdtemp())
    model = ExampleRegressor().eval()
    torch.onnx.export(model, (torch.rand(4, 10),), str(d / "m.onnx"), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    quantize_dynamic(str(d / "m.onnx"), str(d / "mq.onnx"), weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return (ort.InferenceSession(str(d / "m.onnx"), so, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(str(d / "mq.onnx"), so, providers=["CPUExecutionProvider"]))


def make_inputs(work: Path, rows: int) -> tuple[Path, Path, Path]:
    """A CSV (with header) and .npy of ``rows`` example rows, and a 10x smaller CSV."""
    work.mkdir(parents=True, exist_ok=True)
    X = np.random.default_rng(7).random((rows, 10), dtype=np.float32)
    npy, csv, small = work / f"x{rows}.npy", work / f"x{rows}.csv", work / f"x{rows // 10}.csv"
    if not npy.exists():
        np.save(npy, X)
    for path, n in ((csv, rows), (small, rows // 10)):
        if path.exists():
            continue
        with open(path, "w") as f:
            f.write(",".join(f"x{i}" for i in range(10)) + "\n")
            for i in range(0, n, 100_000):
                blk = X[i:min(n, i + 100_000)]
                f.write((("%.9g," * 9 + "%.9g\n") * len(blk)) % tuple(blk.ravel().tolist()))
    return csv, npy, small


def bench_stream(bundle: Path, csv: Path, npy: Path, repeat: int) -> list[str]:
    from toma_edge.device.loaders import block_bytes_for, open_reader
    from toma_edge.device.predictor import Predictor
    from toma_edge.device.runner import run

    out = csv.parent / "bench_out"
    out.mkdir(exist_ok=True)
    p = Predictor(bundle, threads=1, budget="8GiB")
    X = np.load(npy)
    rows = len(X)
    bb = block_bytes_for(p.free_bytes)
    t_pred, t_npy, t_parse, t_csv, t_ltb, t_lt = [], [], [], [], [], []

    def loadtxt_blocks() -> int:  # the alternative parser, through the same block reader
        import io

        r = open_reader(str(csv), row_shape=(10,), block_bytes=bb)
        k, first = 0, True
        for block, _line in r._blocks():  # type: ignore[attr-defined]
            if first:
                block, first = r._header(block)[0], False  # type: ignore[attr-defined]
            a = np.loadtxt(io.BytesIO(block), delimiter=",", dtype=np.float32)
            assert np.isfinite(a.min()) and np.isfinite(a.max())
            k += len(a)
        r.close()
        return k

    for _ in range(repeat):
        t = time.perf_counter()
        p.predict(X)
        t_pred.append(time.perf_counter() - t)
        s = run(bundle, str(npy), str(out / "o.npy"), threads=1, budget="8GiB")
        t_npy.append(s.seconds)
        t = time.perf_counter()
        n = sum(len(c.rows) for c in open_reader(str(csv), row_shape=(10,), block_bytes=bb))
        t_parse.append(time.perf_counter() - t)
        assert n == rows
        s = run(bundle, str(csv), str(out / "o.csv"), threads=1, budget="8GiB")
        t_csv.append(s.seconds)
        t = time.perf_counter()
        assert loadtxt_blocks() == rows
        t_ltb.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.float32)
        t_lt.append(time.perf_counter() - t)
        assert ref.shape == (rows, 10)
        del ref
    r = {k: rows / min(v) for k, v in (("pred", t_pred), ("npy", t_npy), ("parse", t_parse),
                                        ("csv", t_csv), ("ltb", t_ltb))}
    lt = rows / min(t_lt)
    return [
        f"{rows:,} rows, timed inside one process from the first row read to the last row written "
        f"(best of {repeat}; block {bb >> 10} KiB, prefetch depth 4, 1 XNNPACK thread):",
        "",
        "| what | rows/s | ratio | target |",
        "|---|---|---|---|",
        f"| predict() on rows in memory | {r['pred']:,.0f} | | |",
        f"| run: .npy (memory-mapped) -> .npy | {r['npy']:,.0f} | {r['npy'] / r['pred']:.0%} of predict() | >= 60% |",
        f"| CSV read + parse only (pandas C parser, our reader) | {r['parse']:,.0f} | {r['parse'] / lt:.2f}x numpy.loadtxt | |",
        f"| numpy.loadtxt (whole file at once, best of {repeat}) | {lt:,.0f} | | |",
        f"| numpy.loadtxt per block (same block reader, the alternative parser) | {r['ltb']:,.0f} | {r['ltb'] / lt:.2f}x numpy.loadtxt | |",
        f"| run: CSV -> CSV | {r['csv']:,.0f} | {r['csv'] / r['parse']:.0%} of read + parse | >= 70% |",
    ]


def bench_scale(bundle: Path, csv: Path, small: Path, budget: str) -> list[str]:
    """`toma-edge run` processes over 10x fewer and all rows: peak RSS, equality."""
    from toma_edge.device.predictor import Predictor

    res = {}
    for path in (small, csv):
        o = csv.parent / f"out_{path.stem}.csv"
        p = subprocess.run(["toma-edge", "run", str(bundle), "--input", str(path), "--output", str(o),
                            "--threads", "1", "--budget", budget], capture_output=True, text=True,
                           timeout=900)
        if p.returncode:
            raise RuntimeError(p.stderr[-1500:])
        res[path] = (_summary(p.stderr), o)
    import pandas as pd

    (s_small, _), (s_big, o_big) = res[small], res[csv]
    X = pd.read_csv(csv, dtype=np.float32).to_numpy()
    got = pd.read_csv(o_big, dtype=np.float32).to_numpy()
    want = Predictor(bundle, threads=1, budget="8GiB").predict(X).outputs
    equal = bool(np.array_equal(got, want))
    grow = s_big["peak"] / s_small["peak"] - 1
    return [
        f"| `toma-edge run --budget {budget}` over | rows | peak RSS (whole process) | under budget |",
        "|---|---|---|---|",
        f"| {small.name} | {s_small['rows']:,} | {s_small['peak'] / MiB:.1f} MiB | {s_small['peak'] <= s_small['budget']} |",
        f"| {csv.name} | {s_big['rows']:,} | {s_big['peak'] / MiB:.1f} MiB | {s_big['peak'] <= s_big['budget']} |",
        "",
        f"peak RSS 2M vs 200k rows: {grow:+.1%} (target within 10%). Output of the {s_big['rows']:,}-row "
        f"run equals Predictor.predict() on the same parsed rows: {equal} "
        f"(max abs diff {float(np.max(np.abs(got - want))):.3g}).",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/toma-edge-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", default="512MiB")
    ap.add_argument("--only", choices=["start", "predict", "stream", "scale"], default=None)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sections = [a.only] if a.only else ["start", "predict", "stream", "scale"]
    with open("/proc/loadavg") as f:
        print(f"load average at start: {f.read().strip()} ({os.cpu_count()} CPUs)", flush=True)
    csv = npy = small = None
    if {"stream", "scale"} & set(sections):
        csv, npy, small = make_inputs(a.work, a.rows)
    for s in sections:
        print(f"\n### {s}\n", flush=True)
        if s == "start":
            lines = bench_start(a.bundle, a.repeat)
        elif s == "predict":
            lines = bench_predict(a.bundle, a.repeat)
        elif s == "stream":
            assert csv and npy
            lines = bench_stream(a.bundle, csv, npy, a.repeat)
        else:
            assert csv and small
            lines = bench_scale(a.bundle, csv, small, a.budget)
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
