"""The model zoo at realistic sizes: build each model for each target in a fresh process,
then check the bundle against the trained eager model on fresh rows.

    OMP_NUM_THREADS=1 python bench/bench_zoo.py [--models mnv3,resnet18] [--targets rpi4]
        [--size real|tiny] [--fresh-rows 500] [--out bench/results/zoo.md] [--keep DIR]

Models (tests/zoo_models.py): mnv3 (MobileNetV3-Small, 3x64x64, 10 classes), resnet18
(3x64x64, 10 classes), effnet_b0 (efficientnet-pytorch B0, 3x64x64), tcn (pytorch-tcn,
50x4, 4 classes), gru (regressor, 50x4), lstm (50x4, 4 classes), bert (transformers
BertModel from a config, 50x4, 4 classes); each project uses ``quantize: auto`` and
``prune: auto``. Per model and target: build wall time (fresh process, process start
included), shipped variant, reference vs shipped test metric (manifest), top-1 agreement
(classifiers) or |RMSE(bundle) - RMSE(eager)| / std(y) (regressors) on fresh rows run by
``toma-edge run`` against ``<out>.eager.pt`` (build saves it; "pending" where it did not),
the .pte size and the measured peak RSS at batch 1 and at max_batch (manifest). A failed
build is a row with its one-line error; the bench goes on. ``--out`` writes the markdown
table and, beside it, the rows as JSON (same name, .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import zoo_models as zoo  # noqa: E402

_TARGETS = ["rpi4", "rpi-zero-2w"]


def _mib(b: Any) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def bench_one(name: str, target: str, size: str, work: Path, fresh_rows: int,
              compress: str = "auto") -> dict[str, Any]:
    """Build ``name`` for ``target`` and check it; a row of the table (a dict).
    ``compress``: "auto" (quantize and prune auto: the search) or "target" (the target's
    own quantization, no pruning: one export)."""
    e = zoo.ZOO[name]
    folder = work / f"{name}-{target}"
    settings = {} if compress == "auto" else {"compress": {"prune": 0.0}}
    project = zoo.write_project(name, size, folder / "project", **settings)
    out = folder / "bundle"
    print(f"[{name} / {target}] building (progress: {folder / 'build.log'}) ...", flush=True)
    rc, secs, _, err = zoo.cli("build", "--target", target, "--project", str(project),
                               "--out", str(out), timeout=3600, log=folder / "build.log")
    row: dict[str, Any] = {"model": name, "target": target, "size": size,
                           "task": e.task, "build_s": round(secs, 1), "ok": rc == 0}
    if rc != 0:
        row["error"] = zoo.last_error(err)
        print(f"[{name} / {target}] build failed after {secs:.0f} s: {row['error']}",
              flush=True)
        return row
    m = json.loads((out / "manifest.json").read_text())
    metric = "test_accuracy" if e.task == "classification" else "test_r2"
    peaks = m.get("memory", {}).get("measured_peak_bytes") or {}
    row.update({
        "quantization": m["compression"]["quantization"], "prune": m["compression"]["prune"],
        "metric": metric, "reference": m["metrics"]["reference"].get(metric),
        "shipped_metric": m["metrics"]["shipped"].get(metric),
        "pte_bytes": (out / "model.pte").stat().st_size, "max_batch": m["max_batch"],
        "peak_b1": peaks.get("1"), "peak_max": peaks.get(str(m["max_batch"])),
        "candidates": [{k: c.get(k) for k in ("quantization", "prune", "fits", "shipped",
                                              "pte_bytes")} for c in m["candidates"]],
    })
    X, y = e.rows_of(size, fresh_rows, seed=7)
    np.save(folder / "x.npy", X)
    rc, _, _, err = zoo.cli("run", str(out), "-i", str(folder / "x.npy"),
                            "-o", str(folder / "y.npy"))
    if rc != 0:
        row.update(ok=False, error=f"run: {zoo.last_error(err)}")
        return row
    bundle_out = np.load(folder / "y.npy")
    if not zoo.eager_path(out).is_file():
        row["agreement"] = "pending (no <out>.eager.pt)"
    else:
        cmp = zoo.compare(e.task, bundle_out, zoo.eager_outputs(zoo.load_eager(out), X), y)
        row["compare"] = cmp
        row["agreement"] = (f"{cmp['agreement']:.3f}" if e.task == "classification"
                            else f"rmse diff {cmp['rmse_diff']:.4f}")
    print(f"[{name} / {target}] {secs:.0f} s, shipped {row['quantization']} "
          f"prune {row['prune']}, agreement {row['agreement']}", flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | target | build (s) | shipped (quant, prune) | metric: reference -> "
            "shipped | agreement with eager (fresh rows) | .pte (KiB) | peak b1 / max "
            "(MiB) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if not r["ok"] and "quantization" not in r:
            lines.append(f"| {r['model']} | {r['target']} | {r['build_s']} | FAILED: "
                         f"{r.get('error', '')} | | | | |")
            continue
        met = (f"{r['metric']}: {r['reference']:.3f} -> {r['shipped_metric']:.3f}"
               if r.get("reference") is not None else "-")
        agree = r.get("agreement", r.get("error", "-"))
        lines.append(
            f"| {r['model']} | {r['target']} | {r['build_s']} | {r['quantization']}, "
            f"{r['prune']:g} | {met} | {agree} | {r['pte_bytes'] / 1024:.0f} | "
            f"{_mib(r['peak_b1'])} / {_mib(r['peak_max'])} (b{r['max_batch']}) |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(zoo.ZOO),
                    help=f"comma-separated, of {','.join(zoo.ZOO)}")
    ap.add_argument("--targets", default=",".join(_TARGETS))
    ap.add_argument("--size", default="real", choices=["real", "tiny"])
    ap.add_argument("--fresh-rows", type=int, default=500)
    ap.add_argument("--out", default=None, help="markdown file (and .json beside it)")
    ap.add_argument("--keep", default=None, help="build the bundles here and keep them")
    ap.add_argument("--compress", default="auto", choices=["auto", "target"],
                    help="auto: search quantize x prune; target: the target's quantization")
    a = ap.parse_args()
    models = [m for m in a.models.split(",") if m]
    unknown = [m for m in models if m not in zoo.ZOO]
    if unknown:
        print(f"error: unknown model(s) {','.join(unknown)}; "
              f"known: {','.join(zoo.ZOO)}", file=sys.stderr)
        return 2
    targets = [t for t in a.targets.split(",") if t]
    # a user's shell: torch's default threads (build measures which count trains fastest)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-zoo-"))
    load = os.getloadavg()
    rows = [bench_one(m, t, a.size, work, a.fresh_rows, a.compress)
            for m in models for t in targets]
    text = (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
            f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; size {a.size}; "
            f"{a.fresh_rows} fresh rows per model; compress {a.compress}\n\n{table(rows)}\n")
    print("\n" + text)
    if a.out:
        Path(a.out).write_text(text)
        Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
