"""Budgeted loading: every row once per epoch, reshuffled, and RSS within the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from toma_edge.data_loading import BudgetedLoader, CsvSource, open_source, plan_loader
from toma_edge.errors import BudgetError, InputError

MiB = 1 << 20


def _rows_of(loader: BudgetedLoader) -> tuple[list[int], list[int]]:
    order: list[int] = []
    sizes: list[int] = []
    for xb, yb in loader:
        assert np.array_equal(xb[:, 0], yb[:, 0])  # x and y rows stay together
        order.extend(int(v) for v in yb[:, 0])
        sizes.append(len(xb))
    return order, sizes


def test_npy_every_row_once_and_reshuffled(tmp_path: Path) -> None:
    n = 10_000
    X = np.repeat(np.arange(n, dtype=np.float32)[:, None], 8, axis=1)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", X[:, :1].copy())
    loader = BudgetedLoader.from_files(tmp_path / "X.npy", tmp_path / "y.npy",
                                       batch_size=32, budget_bytes=96 * 1024)
    assert loader.plan.chunk_rows < n  # really chunked
    assert loader.plan.in_flight_bytes <= 96 * 1024
    first, sizes = _rows_of(loader)
    assert sorted(first) == list(range(n))
    assert all(s == 32 for s in sizes[:-1]) and len(sizes) == len(loader)
    second, _ = _rows_of(loader)
    assert sorted(second) == list(range(n)) and second != first
    assert first != list(range(n))
    again = BudgetedLoader.from_files(tmp_path / "X.npy", tmp_path / "y.npy",
                                      batch_size=32, budget_bytes=96 * 1024)
    assert _rows_of(again)[0] == first  # the same seed gives the same order


def test_csv_with_header_and_target_column(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    with open(p, "w") as f:
        f.write("a,b,target\n")
        for i in range(1000):
            f.write(f"{i},{i * 0.5},{i}\n")
    src = open_source(p)
    assert isinstance(src, CsvSource) and src.header and src.rows == 1000
    loader = BudgetedLoader(src, batch_size=16, budget_bytes=8 * 1024, target_columns=[-1],
                            shuffle=False)
    xs, ys = [], []
    for xb, yb in loader:
        assert xb.shape[1] == 2 and yb.shape[1] == 1
        xs.append(xb)
        ys.append(yb)
    X, y = np.concatenate(xs), np.concatenate(ys)
    assert np.array_equal(X[:, 0], np.arange(1000, dtype=np.float32))
    assert np.array_equal(y[:, 0], X[:, 0])
    np.testing.assert_allclose(X[:, 1], X[:, 0] * 0.5)

    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3,x\n")
    with pytest.raises(InputError, match="rows 1-2"):
        list(BudgetedLoader(open_source(bad), batch_size=1, budget_bytes=4096))


def test_budget_too_small_and_mismatch(tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match="at least"):
        plan_loader(4096, 10_000, batch_size=64)
    p = plan_loader(64, 1 << 20, batch_size=32)
    assert p.prefetch >= 1 and p.in_flight_bytes <= 1 << 20
    np.save(tmp_path / "a.npy", np.zeros((10, 2), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((11, 1), np.float32))
    with pytest.raises(InputError, match="rows"):
        BudgetedLoader.from_files(tmp_path / "a.npy", tmp_path / "b.npy", batch_size=2,
                                  budget_bytes="1MiB")
    with pytest.raises(InputError):
        open_source(tmp_path / "a.parquet")


TRAIN = textwrap.dedent("""
    import json, sys
    import numpy as np
    from toma_edge.data_loading import BudgetedLoader
    from toma_edge.probes import measure_peak
    x, y, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    w = np.zeros((256, 1), np.float32)
    rows = 0
    loader = BudgetedLoader.from_files(x, y, batch_size=256, budget_bytes=budget)
    with measure_peak() as m:
        for _ in range(2):
            for xb, yb in loader:      # a linear model trained by SGD, all in numpy
                err = xb @ w - yb
                w -= 1e-6 * (xb.T @ err) / len(xb)
                rows += len(xb)
    print(json.dumps(dict(rise=m.rise_bytes, rows=rows)))
""")


def test_training_on_a_file_twice_the_budget_stays_within_it(tmp_path: Path) -> None:
    budget = 24 * MiB
    n = (2 * budget) // (256 * 4) + 100
    X = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float32,
                                  shape=(n, 256))
    for a in range(0, n, 4096):
        X[a:a + 4096] = np.random.default_rng(a).standard_normal(
            (min(4096, n - a), 256), dtype=np.float32)
    X.flush()
    del X
    np.save(tmp_path / "y.npy", np.ones((n, 1), np.float32))
    assert (tmp_path / "X.npy").stat().st_size > 2 * budget
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path / "X.npy"),
                        str(tmp_path / "y.npy"), str(budget)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rows"] == 2 * n
    assert res["rise"] <= budget, res
