"""Compression figures, measured side by side in one run (ExecuTorch runtime, 1 thread).

    OMP_NUM_THREADS=1 python bench/bench_compress.py [--out bench/results/compress.md]

1. Built-in example (MLP 20-64-32-1): fp32 unpruned against int8 with 50% of the hidden
   neurons pruned (L2 |in|*|out| criterion) and fine-tuned; test R2 through the runtime.
2. Digits CNN (examples/digits_cnn, load_digits): fp32 against int8 test accuracy; and
   structured 50% pruning (fine-tuned): .pte size and batch-32 latency, pruned against
   unpruned, interleaved rounds so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from toma_edge.device.adapter import load_program
from toma_edge.host.example import ExampleRegressor, make_data
from toma_edge.host.export import calibration_batches, export_net, export_program, run_rows
from toma_edge.host.prune import finetune, prune_structured
from toma_edge.host.train import TrainSpec, evaluate, train_model

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _export(model, task, X_tr, kind, max_batch=256):  # type: ignore[no-untyped-def]
    ex = torch.as_tensor(X_tr[:32])
    return export_program(export_net(model, task), ex, max_batch=max_batch, quantize=kind,
                          calibration=calibration_batches(X_tr, 8))


def _runtime_metric(res, X, y, task, max_batch=256):  # type: ignore[no-untyped-def]
    prog = load_program(res.pte, threads=1)
    return evaluate(lambda x: run_rows(prog, x, max_batch), X, y, task, prefix="test_")


def _latency_pair(pte_a: bytes, pte_b: bytes, x: np.ndarray, rounds: int = 15, reps: int = 20
                  ) -> tuple[float, float]:
    """Median ms per forward of x, a and b interleaved round by round."""
    a, b = load_program(pte_a, threads=1), load_program(pte_b, threads=1)
    ta, tb = [], []
    for p in (a, b):
        for _ in range(5):
            p.run([x])
    for _ in range(rounds):
        for p, acc in ((a, ta), (b, tb)):
            t = time.perf_counter()
            for _ in range(reps):
                p.run([x])
            acc.append((time.perf_counter() - t) / reps * 1e3)
    return float(np.median(ta)), float(np.median(tb))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--finetune-epochs", type=int, default=20)
    a = ap.parse_args()
    t0 = time.perf_counter()
    lines = [f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; torch {torch.__version__}; "
             "ExecuTorch runtime (pybind, XNNPACK), 1 thread", ""]

    # 1. the built-in example: int8 + 50% pruned + fine-tuned vs unpruned fp32
    X, y, Xt, yt = make_data()
    spec = TrainSpec(task="regression", epochs=100, lr=1e-3, batch_size=32, seed=0)
    torch.manual_seed(0)
    ref = train_model(ExampleRegressor(), X, y, spec)
    fp32 = _export(ref, "regression", X, "fp32")
    small = finetune(prune_structured(ref, 0.5), X, y, spec, epochs=a.finetune_epochs)
    q_small = _export(small, "regression", X, "int8")
    q_full = _export(ref, "regression", X, "int8")
    r_fp32 = _runtime_metric(fp32, Xt, yt, "regression")["test_r2"]
    r_q = _runtime_metric(q_full, Xt, yt, "regression")["test_r2"]
    r_qs = _runtime_metric(q_small, Xt, yt, "regression")["test_r2"]
    lines += [
        "## Built-in example (MLP 20-64-32-1, test split, through the runtime)",
        "",
        "| variant | hidden | .pte bytes | test R2 |",
        "|---|---|---|---|",
        f"| fp32, unpruned | 64-32 | {len(fp32.pte)} | {r_fp32:.4f} |",
        f"| int8, unpruned | 64-32 | {len(q_full.pte)} | {r_q:.4f} |",
        f"| int8, 50% pruned + {a.finetune_epochs} epochs fine-tuning | 32-16 | {len(q_small.pte)} | {r_qs:.4f} |",
        "",
        f"int8 50% pruned: R2 {r_qs:.4f} (>= 0.980: {'yes' if r_qs >= 0.980 else 'NO'}), "
        f"{r_fp32 - r_qs:+.4f} below unpruned fp32 (within 0.005: {'yes' if r_fp32 - r_qs <= 0.005 else 'NO'})",
        "",
    ]
    print("\n".join(lines), flush=True)

    # 2. the digits CNN
    cnn_mod = _load(ROOT / "examples/digits_cnn/cnn_model.py", "bench_cnn_model")
    data_mod = _load(ROOT / "examples/digits_cnn/cnn_data.py", "bench_cnn_data")
    Xc, yc, Xct, yct = data_mod.load()
    cspec = TrainSpec(task="classification", epochs=20, lr=2e-3, batch_size=32, seed=0)
    torch.manual_seed(0)
    cnn = train_model(cnn_mod.build(), Xc, yc, cspec)
    c_fp32 = _export(cnn, "classification", Xc, "fp32", 128)
    c_int8 = _export(cnn, "classification", Xc, "int8", 128)
    pruned = finetune(prune_structured(cnn, 0.5), Xc, yc, cspec, epochs=5)
    p_fp32 = _export(pruned, "classification", Xc, "fp32", 128)
    p_int8 = _export(pruned, "classification", Xc, "int8", 128)
    acc = {k: _runtime_metric(r, Xct, yct, "classification", 128)["test_accuracy"]
           for k, r in (("fp32", c_fp32), ("int8", c_int8), ("p_fp32", p_fp32), ("p_int8", p_int8))}
    x32 = np.ascontiguousarray(Xct[:32])
    lat_f, lat_pf = _latency_pair(c_fp32.pte, p_fp32.pte, x32)
    lat_i, lat_pi = _latency_pair(c_int8.pte, p_int8.pte, x32)
    out = [
        "## Digits CNN (examples/digits_cnn: Conv16-BN-ReLU, Conv32-BN-ReLU, MaxPool, Linear64, Linear10; 20 epochs)",
        "",
        "| variant | channels | .pte bytes | batch-32 ms | test accuracy |",
        "|---|---|---|---|---|",
        f"| fp32 | 16-32-64 | {len(c_fp32.pte)} | {lat_f:.3f} | {acc['fp32']:.2%} |",
        f"| fp32, 50% pruned + 5 epochs | 8-16-32 | {len(p_fp32.pte)} | {lat_pf:.3f} | {acc['p_fp32']:.2%} |",
        f"| int8 | 16-32-64 | {len(c_int8.pte)} | {lat_i:.3f} | {acc['int8']:.2%} |",
        f"| int8, 50% pruned + 5 epochs | 8-16-32 | {len(p_int8.pte)} | {lat_pi:.3f} | {acc['p_int8']:.2%} |",
        "",
        f"int8 against fp32 accuracy: {100 * (acc['int8'] - acc['fp32']):+.2f} points "
        f"(within 1 point: {'yes' if abs(acc['int8'] - acc['fp32']) <= 0.01 else 'NO'})",
        f"50% structured pruning, fp32: .pte {1 - len(p_fp32.pte) / len(c_fp32.pte):.1%} smaller, "
        f"batch-32 latency {1 - lat_pf / lat_f:.1%} lower",
        f"50% structured pruning, int8: .pte {1 - len(p_int8.pte) / len(c_int8.pte):.1%} smaller, "
        f"batch-32 latency {1 - lat_pi / lat_i:.1%} lower",
        "",
        f"bench wall time {time.perf_counter() - t0:.0f} s",
    ]
    print("\n".join(out), flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(lines + out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
