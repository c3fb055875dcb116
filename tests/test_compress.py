"""The compression search: candidates, the choice rule, budgets in build, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from toma_edge.errors import BudgetError
from toma_edge.host.search import Candidate, candidate_variants, choose, validation_split
from toma_edge.project import CompressConfig


def _cand(q: str, prune: float, pte: int, value: float, fits: bool = True, over: float = 0.0,
          miss: str = "") -> Candidate:
    return Candidate(q, prune, pte, 1000, 2000, 0.01, "val_r2", value, fits,  # type: ignore[arg-type]
                     miss, over)


def test_variants_follow_the_config() -> None:
    assert candidate_variants(CompressConfig(quantize="int8", prune=0.0)) == [("int8", 0.0)]
    assert candidate_variants(CompressConfig(quantize="none", prune=0.5)) == [("fp32", 0.5)]
    auto = candidate_variants(CompressConfig(quantize="auto", prune="auto"))
    assert len(auto) == 9 and {q for q, _ in auto} == {"fp32", "int8", "int8-dynamic"}
    assert {r for _, r in auto} == {0.0, 0.25, 0.5}
    assert candidate_variants(CompressConfig(quantize="auto", prune="auto"), prunable=False) == [
        ("fp32", 0.0), ("int8", 0.0), ("int8-dynamic", 0.0)]


def test_choose_smallest_fitting_within_tolerance_of_best() -> None:
    cands = [
        _cand("fp32", 0.0, 17000, 0.986),
        _cand("int8", 0.0, 10000, 0.984),
        _cand("int8", 0.5, 7000, 0.979),                     # 0.007 below the best: too far
        _cand("int8-dynamic", 0.5, 6000, 0.999, fits=False, over=0.1, miss="x"),  # best, no fit
    ]
    assert choose(cands, tolerance=0.005) is cands[1]
    assert choose(cands, tolerance=0.01) is cands[2]
    assert choose(cands, tolerance=0.0) is cands[0]


def test_none_fits_names_the_closest_and_the_miss() -> None:
    cands = [
        _cand("fp32", 0.0, 17000, 0.98, fits=False, over=3.0, miss="model.pte 16.6 KiB is 12.6 KiB over"),
        _cand("int8", 0.5, 7000, 0.97, fits=False, over=0.7, miss="model.pte 6.8 KiB is 2.8 KiB over"),
    ]
    with pytest.raises(BudgetError, match=r"rpi4: the closest, int8 pruned 50%, misses: model.pte 6.8 KiB is 2.8 KiB over"):
        choose(cands, tolerance=0.005, target="rpi4")


def test_validation_split_is_disjoint_and_stratified() -> None:
    y = np.repeat(np.arange(5), 40)
    fit, val = validation_split(len(y), task="classification", y=y, fraction=0.2, seed=0)
    assert len(set(fit) & set(val)) == 0 and len(fit) + len(val) == len(y)
    assert np.bincount(y[val]).tolist() == [8] * 5


def _project(tmp_path: Path, quantize: str, prune: str | float = 0.0, epochs: int = 15) -> Path:
    p = tmp_path / f"proj-{quantize}-{prune}.yaml"
    p.write_text(
        "name: small-example\n"
        "task: regression\n"
        "model: toma_edge.host.example:ExampleRegressor\n"
        "data: toma_edge.host.example:make_data\n"
        f"train: {{epochs: {epochs}, lr: 0.003, batch_size: 32, folds: 0, seed: 0}}\n"
        f"compress: {{quantize: {quantize}, prune: {prune}}}\n"
        "export: {max_batch: 64}\n"
    )
    return p


@pytest.mark.slow
def test_storage_budget_below_fp32_ships_a_compressed_variant_that_fits(tmp_path: Path) -> None:
    from toma_edge.host import build

    budget = 12 * 1024  # the fp32 program of this model is about 17 KiB
    res = build(target="rpi", project=_project(tmp_path, "auto"), out=tmp_path / "b",
                storage_budget=budget)
    m = res.manifest
    cands = {c["quantization"]: c for c in m["candidates"]}
    assert set(cands) == {"fp32", "int8", "int8-dynamic"}
    assert cands["fp32"]["pte_bytes"] > budget and cands["fp32"]["fits"] is False
    assert "storage budget" in cands["fp32"]["miss"]
    assert m["shipped"] in ("int8", "int8-dynamic") and cands[m["shipped"]]["shipped"] is True
    assert m["batch_dependent"] is (m["shipped"] == "int8-dynamic")
    pte = (res.out / "model.pte").stat().st_size
    assert pte <= budget and pte == m["memory"]["pte_bytes"]
    # the search scored on validation rows: every candidate has a val metric, test stays out
    assert all(isinstance(c["val_r2"], float) for c in m["candidates"])
    assert m["metrics"]["shipped"]["test_r2"] > 0.9
    on_disk = json.loads((res.out / "manifest.json").read_text())
    assert on_disk["candidates"] == m["candidates"]
    assert {"predictions.png", "candidates.png"} <= set(on_disk["files"])


@pytest.mark.slow
def test_impossible_budget_fails_clearly_and_writes_no_bundle(tmp_path: Path) -> None:
    from toma_edge.cli import main

    out = tmp_path / "never"
    r = CliRunner().invoke(main, ["build", "--target", "rpi", "--project",
                                  str(_project(tmp_path, "int8", epochs=3)), "--out", str(out),
                                  "--storage-budget", "1KiB"])
    assert r.exit_code == 2
    err = r.stderr if hasattr(r, "stderr") else r.output
    assert "no compression variant fits rpi4: the closest, int8 pruned 0%" in err
    assert "over the 1.0 KiB storage budget" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no temp left


def test_example_bundle_records_its_candidate_and_pictures(example_bundle: Path) -> None:
    from toma_edge.bundle import sha256_file

    m = json.loads((example_bundle / "manifest.json").read_text())
    assert m["compression"] == {"quantization": "int8", "prune": 0.0}
    [c] = m["candidates"]
    assert c["quantization"] == "int8" and c["prune"] == 0.0 and c["fits"] and c["shipped"]
    assert c["pte_bytes"] == m["memory"]["pte_bytes"] and c["latency_ms"] > 0
    assert c["cv_r2"] == pytest.approx(m["metrics"]["shipped"]["cv_r2"])
    for png in ("predictions.png", "candidates.png"):
        data = (example_bundle / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert m["files"][png]["sha256"] == sha256_file(example_bundle / png)


def test_digits_bundle_has_a_confusion_matrix(digits_bundle: Path) -> None:
    m = json.loads((digits_bundle / "manifest.json").read_text())
    assert "confusion.png" in m["files"] and "predictions.png" not in m["files"]


@pytest.mark.slow
def test_compress_command_over_a_saved_state_dict(tmp_path: Path) -> None:
    import torch

    from toma_edge.cli import main
    from toma_edge.host.example import ExampleRegressor, make_data
    from toma_edge.host.train import TrainSpec, train_model

    X, y, _, _ = make_data()
    torch.manual_seed(0)
    model = train_model(ExampleRegressor(), X, y, TrainSpec(task="regression", epochs=10, lr=3e-3))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "c"
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "model.pt"), "--target", "rpi",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["shipped"] == "int8" and m["build"]["command"] == "compress"
    assert [c["quantization"] for c in m["candidates"]] == ["int8"]
    ref = m["metrics"]["reference"]["test_r2"]
    assert abs(ref - m["metrics"]["shipped"]["test_r2"]) < 0.02

    bad = CliRunner().invoke(main, ["compress", str(tmp_path / "missing.pt"), "--out", str(out)])
    assert bad.exit_code == 2 and "no such model file" in bad.output


@pytest.mark.slow
def test_fixed_prune_ratio_ships_a_smaller_pruned_program(tmp_path: Path, example_bundle: Path) -> None:
    from toma_edge.host import build

    res = build(target="rpi", project=_project(tmp_path, "int8", prune=0.5, epochs=10),
                out=tmp_path / "p")
    m = res.manifest
    assert m["compression"] == {"quantization": "int8", "prune": 0.5}
    assert m["shipped"] == "int8"
    unpruned = json.loads((example_bundle / "manifest.json").read_text())
    # half the hidden neurons gone: the program really is smaller, and it still predicts
    assert m["memory"]["pte_bytes"] < unpruned["memory"]["pte_bytes"]
    assert m["metrics"]["shipped"]["test_r2"] > 0.9
