"""Predictor: any number of rows, batches within the budget, clear input errors."""

from __future__ import annotations

import dataclasses
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toma_edge.device.bundle import LoadedBundle, load_bundle
from toma_edge.device.predictor import Predictor
from toma_edge.errors import BudgetError, InputError
from toma_edge.probes import measure_peak, rss_bytes


@pytest.fixture(scope="module")
def loaded(example_bundle: Path) -> LoadedBundle:
    return load_bundle(example_bundle, threads=1)


@pytest.fixture(scope="module")
def predictor(loaded: LoadedBundle) -> Predictor:
    return Predictor(loaded, budget="4GiB")


def _raw(b: LoadedBundle, x: np.ndarray) -> np.ndarray:
    mb = b.manifest.max_batch
    return np.concatenate([b.program.run([x[i:i + mb]])[0] for i in range(0, len(x), mb)])


def test_any_number_of_rows_equals_raw_program(predictor: Predictor, loaded: LoadedBundle) -> None:
    x = np.random.default_rng(0).random((1000, 10), dtype=np.float32)  # 3 full batches + 232
    got = predictor.predict(x)
    assert got.outputs.shape == (1000, 1) and got.classes is None
    np.testing.assert_array_equal(got.outputs, _raw(loaded, x))
    # rows don't depend on their batch (int8 static quantization)
    np.testing.assert_array_equal(predictor.predict(x[:7]).outputs, got.outputs[:7])
    assert predictor.predict(np.empty((0, 10), np.float32)).outputs.shape == (0, 1)


def test_inputs_other_dtypes(predictor: Predictor) -> None:
    rows = [[0.5] * 10, [0.25] * 10]
    want = predictor.predict(np.asarray(rows, np.float32)).outputs
    np.testing.assert_array_equal(predictor.predict(rows).outputs, want)
    np.testing.assert_array_equal(predictor.predict(np.asarray(rows, np.float64)).outputs, want)
    np.testing.assert_array_equal(predictor.predict(np.asarray(rows, np.float32)[:, ::1].T.copy().T).outputs, want)
    assert predictor.predict(np.ones((3, 10), np.int64)).outputs.shape == (3, 1)


@pytest.mark.parametrize(
    "rows, message",
    [
        (np.zeros((4, 11), np.float32), r"10 values.*got rows of \[11\]"),
        (np.zeros(10, np.float32), "one flat row"),
        (np.zeros((2, 2, 5), np.float32), r"got rows of \[2, 5\]"),
        ([[0.0] * 10, [0.0] * 9], "same length"),
        ([["a"] * 10], "list of 10 numbers"),
        (np.array([["1"] * 10]), "real numbers, got dtype <U1"),
        (np.ones((4, 10), np.complex64), "real numbers"),
        (np.where(np.arange(40).reshape(4, 10) == 23, np.nan, 0.0), r"row 2 .*nan.*column 3"),
        (np.full((2, 10), 1e300), "row 0 .*non-finite"),
    ],
)
def test_bad_input(predictor: Predictor, rows: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        predictor.predict(rows)


def test_baseline_over_budget(loaded: LoadedBundle) -> None:
    with pytest.raises(BudgetError, match="baseline RSS .* already exceeds"):
        Predictor(loaded, budget="64MiB")


def test_budget_sizes_batches(loaded: LoadedBundle) -> None:
    # peaks that grow with the batch (a 10-feature MLP's measured ones can be flat under
    # the native adapter: its first call's fixed cost hides the per-row cost)
    mem = loaded.manifest.memory.model_copy(update={"measured_peak_bytes": {
        str(b): (1 << 20) + b * (64 << 10) for b in (1, 8, 32, 64, 128, 256)}})
    loaded = dataclasses.replace(loaded, manifest=loaded.manifest.model_copy(update={"memory": mem}))
    m = loaded.manifest.memory
    with pytest.raises(BudgetError, match="at batch 1"):
        Predictor(loaded, budget=rss_bytes() + m.peak_for_batch(1) // 2)
    p = Predictor(loaded, budget=rss_bytes() + m.peak_for_batch(100))
    assert 8 <= p.batch_size < loaded.manifest.max_batch
    assert p.fitting_batch(m.peak_for_batch(loaded.manifest.max_batch)) == loaded.manifest.max_batch
    assert p.fitting_batch(0) == 0


class _Hungry:
    """The real program, plus a scratch buffer of ``per_row`` bytes per row touched per
    batch: what a runtime whose workspace grows with the batch would do."""

    def __init__(self, program: Any, per_row: int) -> None:
        self.p, self.per_row = program, per_row
        self.adapter, self.inputs, self.outputs = program.adapter, program.inputs, program.outputs
        self.sizes: list[int] = []

    def _scratch(self, rows: int) -> mmap.mmap:
        self.sizes.append(rows)
        # mmap, not malloc: glibc would keep freed blocks resident and blur the readings
        scratch = mmap.mmap(-1, rows * self.per_row)
        view = np.frombuffer(scratch, dtype=np.uint8)
        view[::4096] = 1  # touch every page
        del view
        return scratch

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        scratch = self._scratch(len(arrays[0]))
        out = self.p.run(arrays)
        scratch.close()
        return list(out)

    def run_batches_into(self, x: np.ndarray, out: np.ndarray, size: int) -> None:
        for i in range(0, len(x), size):
            scratch = self._scratch(len(x[i:i + size]))
            self.p.run_batches_into(x[i:i + size], out[i:i + size], size)
            scratch.close()

    def close(self) -> None:
        self.p.close()

    @property
    def closed(self) -> bool:
        return bool(self.p.closed)


def test_adapts_when_the_measured_peak_exceeds_the_budget(loaded: LoadedBundle) -> None:
    hungry = _Hungry(loaded.program, per_row=256 << 10)  # 64 MiB at batch 256
    b = dataclasses.replace(loaded, program=hungry)
    budget = rss_bytes() + loaded.manifest.memory.peak_for_batch(256) + (24 << 20)
    p = Predictor(b, budget=budget, measure_interval_s=0.0)
    assert p.batch_size == 256  # the manifest says it fits
    x = np.random.default_rng(1).random((3000, 10), dtype=np.float32)
    got = p.predict(x)
    np.testing.assert_array_equal(got.outputs, _raw(loaded, x))
    assert any(e.kind == "shrink" and e.reason == "over_budget" for e in p.events)
    # it settles on a size that fits, after a few finished (kept) batches over the budget
    assert p.batch_size < 128
    assert sum(e.reason == "over_budget" for e in p.events) <= 3
    with measure_peak() as m:
        got2 = p.predict(x[:1000])
    np.testing.assert_array_equal(got2.outputs, got.outputs[:1000])
    assert m.peak_bytes <= budget


def test_classification_adds_classes(digits_bundle: Path) -> None:
    p = Predictor(digits_bundle, threads=1, budget="4GiB")
    x = np.random.default_rng(2).random((5, p.input_spec.width), dtype=np.float32) * 16
    got = p.predict(x)
    assert got.class_index is not None and got.classes is not None
    np.testing.assert_array_equal(got.class_index, got.outputs.argmax(axis=1))
    assert got.classes == [p.manifest.classes[i] for i in got.class_index]  # type: ignore[index]
    np.testing.assert_allclose(got.outputs.sum(axis=1), 1.0, atol=1e-3)
