"""The foundation's promises about `toma-edge build --target rpi` on the built-in example."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toma_edge.host.example import make_data, noise_free_target

DESIGN_KEYS = {
    "schema_version", "name", "version", "task", "target", "inputs", "outputs", "max_batch",
    "shipped", "compression", "batch_dependent", "memory", "metrics", "files", "versions",
}


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_bundle_has_design_keys(example_bundle: Path) -> None:
    m = _manifest(example_bundle)
    assert DESIGN_KEYS <= set(m)
    assert m["schema_version"] == 1
    assert m["target"]["name"] == "rpi4" and m["target"]["arch"] == "aarch64"
    assert m["inputs"] == [{"name": "x", "shape": [-1, 10], "dtype": "float32"}]
    assert m["outputs"][0]["shape"] == [-1, 1]
    assert m["shipped"] == "int8" and m["compression"]["quantization"] == "int8"
    assert m["batch_dependent"] is False
    assert {"pte_bytes", "planned_bytes", "measured_peak_bytes"} <= set(m["memory"])
    assert m["memory"]["pte_bytes"] == (example_bundle / "model.pte").stat().st_size
    assert str(m["max_batch"]) in m["memory"]["measured_peak_bytes"]
    assert "1" in m["memory"]["measured_peak_bytes"]
    assert set(m["versions"]) >= {"toma_edge", "torch", "executorch"}
    assert m["files"]["model.pte"]["bytes"] == m["memory"]["pte_bytes"]


def test_accuracy_of_shipped_int8(example_bundle: Path) -> None:
    met = _manifest(example_bundle)["metrics"]
    ref, shipped = met["reference"], met["shipped"]
    for part in (ref, shipped):
        assert {"test_r2", "test_rmse", "cv_r2", "cv_rmse"} <= set(part)
    assert shipped["test_r2"] >= 0.980
    assert abs(ref["test_r2"] - shipped["test_r2"]) <= 0.003


def test_program_in_executorch_runtime_matches_eager_int8(example_build) -> None:  # type: ignore[no-untyped-def]
    from executorch.runtime import Runtime

    rows = torch.rand(256, 10, generator=torch.Generator().manual_seed(7))
    method = Runtime.get().load_program(str(example_build.out / "model.pte")).load_method("forward")
    got = method.execute([rows])[0]
    want = example_build.reference(rows)
    step = float(want.max() - want.min()) / 255.0
    # XNNPACK and the eager int8 simulation round requantization differently: at most
    # one or two 8-bit output steps apart, and nearly always equal
    assert torch.max(torch.abs(got - want)).item() <= 2 * step
    assert torch.mean(torch.abs(got - want)).item() <= 0.25 * step


def test_fresh_rows_rmse_against_noise_free_target(example_bundle: Path) -> None:
    from toma_edge.device.adapter import load_program

    X_fresh = np.random.default_rng(2026).random((256, 10)).astype(np.float32)
    # make sure these rows are not the training data
    X_tr, _, X_te, _ = make_data()
    assert not np.isin(X_fresh[:, 0], X_tr[:, 0]).any()
    (pred,) = load_program(example_bundle / "model.pte").run([X_fresh])
    rmse = float(np.sqrt(np.mean((pred - noise_free_target(X_fresh)) ** 2)))
    assert rmse <= 0.06, rmse


def test_build_summary_and_speed_recorded(example_build) -> None:  # type: ignore[no-untyped-def]
    text = "\n".join(example_build.summary)
    assert "test_r2" in text and "int8" in text and "inference budget" in text
    assert example_build.seconds > 0


@pytest.mark.parametrize("name", ["model.pte", "manifest.json"])
def test_nothing_temporary_left_beside_bundle(example_bundle: Path, name: str) -> None:
    assert (example_bundle / name).is_file()
    leftovers = [p.name for p in example_bundle.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
