"""The README's worked example: a digits classifier from a project file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from toma_edge.device.adapter import load_program


def test_digits_project_builds_a_classifier(digits_bundle: Path) -> None:
    m = json.loads((digits_bundle / "manifest.json").read_text())
    assert m["name"] == "digits-mlp" and m["task"] == "classification"
    assert m["classes"] == [str(i) for i in range(10)]
    assert m["inputs"][0]["shape"] == [-1, 64] and m["outputs"][0]["shape"] == [-1, 10]
    assert m["max_batch"] == 128
    ref, shipped = m["metrics"]["reference"], m["metrics"]["shipped"]
    assert {"test_accuracy", "cv_accuracy"} <= set(shipped)
    assert shipped["test_accuracy"] >= 0.93
    assert abs(ref["test_accuracy"] - shipped["test_accuracy"]) <= 0.02


def test_digits_program_outputs_probabilities(digits_bundle: Path) -> None:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    (p,) = load_program(digits_bundle / "model.pte").run([X[:100].astype(np.float32)])
    assert p.shape == (100, 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-3)
    assert (p.argmax(axis=1) == y[:100]).mean() >= 0.9
