"""A project's data callable may return file paths: training reads them within the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from toma_edge.data_loading import BudgetedLoader, NpySource
from toma_edge.errors import InputError
from toma_edge.host.source import load_source
from toma_edge.host.train import TrainSpec, evaluate, evaluate_data, train_model
from toma_edge.host.training_data import ArrayData, FileData

FEATURES = 1024  # 4 KiB rows: few rows per MiB, so one epoch over a large file is quick
BUDGET = 640 << 20  # the training process's peak RSS: torch, sklearn and a first step hold ~520 MiB
TRAIN_BYTES = 2 * BUDGET


def _write_project(root: Path, *, train_rows: int, model_width: int = FEATURES,
                   data_body: str | None = None, quantize: str = "int8", folds: int = 2,
                   data_mod: str = "mydata") -> Path:
    (root / "mymodel.py").write_text(textwrap.dedent(f"""
        from torch import nn
        def build():
            return nn.Sequential(nn.Linear({model_width}, 16), nn.ReLU(), nn.Linear(16, 1))
    """))
    body = data_body or textwrap.dedent("""
        def load():
            return "X_train.npy", "y_train.npy", "X_test.npy", "y_test.npy"
    """)
    (root / f"{data_mod}.py").write_text(body)  # a new name per body: imports are cached
    (root / "toma-edge.yaml").write_text(textwrap.dedent(f"""
        name: big-file
        task: regression
        model: mymodel:build
        data: {data_mod}:load
        train: {{epochs: 1, lr: 0.001, batch_size: 256, folds: {folds}}}
        compress: {{quantize: {quantize}, prune: 0.0}}
        export: {{max_batch: 64}}
    """))
    return root / "toma-edge.yaml"


def _write_npy(root: Path, train_rows: int, test_rows: int = 512) -> None:
    """X_train written a slice at a time (the test process never holds it either)."""
    w = np.random.default_rng(0).standard_normal(FEATURES).astype(np.float32) / 32
    X = np.lib.format.open_memmap(root / "X_train.npy", mode="w+", dtype=np.float32,
                                  shape=(train_rows, FEATURES))
    y = np.lib.format.open_memmap(root / "y_train.npy", mode="w+", dtype=np.float32,
                                  shape=(train_rows,))
    step = 16384
    for a in range(0, train_rows, step):
        rng = np.random.default_rng(a)
        xs = rng.standard_normal((min(step, train_rows - a), FEATURES), dtype=np.float32)
        X[a:a + len(xs)] = xs
        y[a:a + len(xs)] = xs @ w
    X.flush()
    y.flush()
    del X, y
    rng = np.random.default_rng(1)
    Xt = rng.standard_normal((test_rows, FEATURES), dtype=np.float32)
    np.save(root / "X_test.npy", Xt)
    np.save(root / "y_test.npy", (Xt @ w).astype(np.float32))


_RUNNER = textwrap.dedent("""
    import json, sys
    from toma_edge.host import build
    from toma_edge.progress import NullProgress
    from toma_edge.probes import enable_exact_peaks, peak_probe

    class PhasePeaks(NullProgress):
        # the exact peak RSS (VmHWM) of the training phase, through the process-wide probe
        def __init__(self):
            self.ctx = None
            self.out = {}
        def phase(self, name, total=None):
            if self.ctx is not None:
                self.ctx.__exit__(None, None, None)
                self.out["train_start"] = self.m.start_bytes
                self.out["train_peak"] = self.m.peak_bytes
                self.ctx = None
            if name == "training":
                self.ctx = peak_probe().measure()
                self.m = self.ctx.__enter__()
        def info(self, msg):
            print("info:", msg, file=sys.stderr)

    enable_exact_peaks()
    rep = PhasePeaks()
    res = build(target="rpi", project=sys.argv[1], out=sys.argv[2], train_budget=int(sys.argv[3]),
                progress=rep)
    rep.out["metrics"] = res.manifest["metrics"]
    rep.out["seconds"] = res.seconds
    print(json.dumps(rep.out))
""")


def test_build_trains_from_npy_file_twice_the_budget(tmp_path: Path) -> None:
    rows = TRAIN_BYTES // (4 * FEATURES)
    _write_npy(tmp_path, rows)
    assert (tmp_path / "X_train.npy").stat().st_size >= TRAIN_BYTES
    # fp32 keeps it quick (int8 calibration on a sample is covered by the digits-style checks);
    # folds: 2, since folds: 0 with one variant trips compress.choose (no cv metric)
    proj = _write_project(tmp_path, train_rows=rows, quantize="none", folds=2)
    runner = tmp_path / "run_build.py"
    runner.write_text(_RUNNER)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, str(runner), str(proj), str(tmp_path / "dist"), str(BUDGET)],
                       capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"training phase: start {out['train_start'] >> 20} MiB, peak {out['train_peak'] >> 20} MiB, "
          f"budget {BUDGET >> 20} MiB, file {(tmp_path / 'X_train.npy').stat().st_size >> 20} MiB; "
          f"build {out['seconds']:.1f} s; {out['metrics']}")
    assert out["metrics"]["reference"]["cv_r2"] > 0.8
    # the whole process stays inside the training budget while it trains on twice that
    assert out["train_peak"] <= BUDGET, out
    # and it learned the linear target (the model is a small MLP; one epoch)
    assert out["metrics"]["reference"]["test_r2"] > 0.8


def test_file_data_matches_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 8), dtype=np.float32)
    y = X.sum(axis=1, keepdims=True)
    np.save(tmp_path / "X.npy", X)
    np.savetxt(tmp_path / "y.csv", y, delimiter=",")
    fd = FileData.open(tmp_path / "X.npy", tmp_path / "y.csv", task="regression")
    assert fd.rows == 1000 and fd.row_shape == (8,)
    idx = np.sort(rng.choice(1000, size=300, replace=False))
    sub = fd.subset(idx)
    seen = np.concatenate([xb for xb, _ in sub.loader(32, budget_bytes=1 << 20, seed=3)])
    assert len(seen) == 300
    np.testing.assert_array_equal(np.sort(seen[:, 0]), np.sort(X[idx, 0]))
    hx, hy = sub.head(5)
    np.testing.assert_array_equal(hx, X[idx[:5]])
    np.testing.assert_allclose(hy, y[idx[:5]], rtol=1e-6)
    # streamed evaluation gives the figures evaluate() gives on the arrays
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)

    def predict(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(a)).numpy()

    want = evaluate(predict, X[idx], y[idx], "regression")
    got = evaluate_data(predict, sub, "regression")
    assert got == pytest.approx(want, rel=1e-5)
    # training from files runs and learns
    spec = TrainSpec(task="regression", epochs=8, lr=3e-2, batch_size=32)
    m = train_model(torch.nn.Linear(8, 1), fd, None, spec)
    assert evaluate_data(lambda a: m(torch.from_numpy(a)).detach().numpy(), fd, "regression")["r2"] > 0.9
    # ArrayData trains exactly as its arrays
    a = train_model(torch.nn.Linear(8, 1), X, y, spec)
    b = train_model(torch.nn.Linear(8, 1), ArrayData(X, y), None, spec)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_loader_indices_read_only_those_rows(tmp_path: Path) -> None:
    X = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    np.save(tmp_path / "X.npy", X)
    idx = np.arange(3, 1000, 7)
    ld = BudgetedLoader(NpySource(tmp_path / "X.npy"), batch_size=16, budget_bytes=16 * 4 * 4 * 8,
                        indices=idx, shuffle=False)
    got = np.concatenate(list(ld))
    np.testing.assert_array_equal(got, X[idx])
    assert ld.rows == len(idx)


def test_bad_paths_and_row_counts_are_one_line_errors(tmp_path: Path) -> None:
    _write_npy(tmp_path, 64, test_rows=16)
    proj = _write_project(tmp_path, train_rows=64, data_mod="data_1", data_body=textwrap.dedent("""
        def load():
            return "missing.npy", "y_train.npy", "X_test.npy", "y_test.npy"
    """))
    with pytest.raises(InputError, match=r"X_train path .*missing.npy does not exist"):
        load_source(proj)
    np.save(tmp_path / "y_short.npy", np.zeros(10, np.float32))
    proj = _write_project(tmp_path, train_rows=64, data_mod="data_2", data_body=textwrap.dedent("""
        def load():
            return "X_train.npy", "y_short.npy", "X_test.npy", "y_test.npy"
    """))
    with pytest.raises(InputError, match="X_train has 64 rows but y_train has 10") as ei:
        load_source(proj)
    assert "\n" not in str(ei.value)
    (tmp_path / "notes.txt.bin").write_bytes(b"x")
    proj = _write_project(tmp_path, train_rows=64, data_mod="data_3", data_body=textwrap.dedent("""
        def load():
            return "X_train.npy", "y_train.npy", "notes.txt.bin", "y_test.npy"
    """))
    with pytest.raises(InputError, match="not a .npy or .csv file"):
        load_source(proj)
    bad = np.lib.format.open_memmap(tmp_path / "X_nan.npy", mode="w+", dtype=np.float32,
                                    shape=(64, FEATURES))
    bad[:] = 0
    bad[40, 3] = np.nan
    bad.flush()
    del bad
    proj = _write_project(tmp_path, train_rows=64, data_mod="data_4", data_body=textwrap.dedent("""
        def load():
            return "X_nan.npy", "y_train.npy", "X_test.npy", "y_test.npy"
    """))
    with pytest.raises(InputError, match=r"NaN or infinite values \(row 41\)"):
        load_source(proj)


def test_path_project_loads_lazily(tmp_path: Path) -> None:
    _write_npy(tmp_path, 200, test_rows=16)
    src = load_source(_write_project(tmp_path, train_rows=200))
    assert isinstance(src.training, FileData) and src.training.rows == 200
    assert len(src.X_train) == 200 and src.X_test.shape == (16, FEATURES)


def test_build_from_csv_files_end_to_end(tmp_path: Path) -> None:
    """CSV training and test files (with a header) through the whole build, in process."""
    from toma_edge.host import build

    rng = np.random.default_rng(5)
    w = rng.standard_normal(8).astype(np.float32)
    for name, n in (("train", 600), ("test", 150)):
        X = rng.random((n, 8), dtype=np.float32)
        np.savetxt(tmp_path / f"X_{name}.csv", X, delimiter=",", fmt="%.6f",
                   header=",".join(f"f{i}" for i in range(8)), comments="")
        np.savetxt(tmp_path / f"y_{name}.csv", X @ w, fmt="%.6f", header="y", comments="")
    (tmp_path / "csvmodel.py").write_text(
        "from torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))\n")
    (tmp_path / "csvdata.py").write_text(
        "def load():\n    return 'X_train.csv', 'y_train.csv', 'X_test.csv', 'y_test.csv'\n")
    (tmp_path / "toma-edge.yaml").write_text(
        "name: csv-files\ntask: regression\nmodel: csvmodel:build\ndata: csvdata:load\n"
        "train: {epochs: 30, lr: 0.01, batch_size: 32, folds: 2}\n"
        "compress: {quantize: int8, prune: 0.0}\nexport: {max_batch: 32}\n")
    res = build(target="rpi", project=tmp_path / "toma-edge.yaml", out=tmp_path / "b")
    m = res.manifest
    assert m["inputs"][0]["shape"] == [-1, 8]
    assert m["build"]["data"]["train_rows"] == 600
    assert {"cv_r2", "test_r2"} <= set(m["metrics"]["reference"])
    assert m["metrics"]["shipped"]["test_r2"] > 0.9
