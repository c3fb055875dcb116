"""Structured pruning removes whole units and keeps what the remaining ones compute."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from toma_edge.errors import ConfigError
from toma_edge.host.example import ExampleRegressor
from toma_edge.host.prune import (
    PrunePair,
    find_prunable,
    prune_magnitude,
    prune_structured,
    unit_scores,
)

CNN_MODEL = Path(__file__).resolve().parent.parent / "examples" / "digits_cnn" / "cnn_model.py"


def _cnn() -> Any:
    spec = importlib.util.spec_from_file_location("digits_cnn_model_for_tests", CNN_MODEL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    m = mod.DigitsCNN()
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(3):
            m(torch.rand(64, 64) * 16)
    return m.eval()


def test_finds_mlp_and_cnn_pairs_including_flatten_boundary() -> None:
    assert find_prunable(ExampleRegressor()) == [
        PrunePair("net.0", "net.2", None, 1), PrunePair("net.2", "net.4", None, 1)]
    assert find_prunable(_cnn()) == [
        PrunePair("net.0", "net.3", "net.1", 1),
        PrunePair("net.3", "net.8", "net.4", 16),  # 32 channels x 4x4 -> Linear(512)
        PrunePair("net.8", "net.10", None, 1),
    ]


def test_mlp_half_pruned_shapes_and_parameter_count() -> None:
    m: Any = ExampleRegressor()
    p: Any = prune_structured(m, 0.5)
    assert [tuple(layer.weight.shape) for layer in p.net if isinstance(layer, nn.Linear)] == [
        (32, 20), (16, 32), (1, 16)]
    assert sum(t.numel() for t in p.parameters()) == 32 * 21 + 16 * 33 + 17
    assert p(torch.rand(5, 10)).shape == (5, 1)
    # the original is untouched
    assert m.net[0].weight.shape == (64, 20)


@torch.no_grad()
def test_pruning_dead_mlp_units_keeps_outputs_exactly() -> None:
    torch.manual_seed(1)
    m: Any = ExampleRegressor().eval()
    dead1 = torch.randperm(64)[:32]
    dead2 = torch.randperm(32)[:16]
    m.net[2].weight[:, dead1] = 0.0  # nobody reads these units: importance 0
    m.net[4].weight[:, dead2] = 0.0
    p: Any = prune_structured(m, 0.5)
    x = torch.rand(50, 10)
    torch.testing.assert_close(p(x), m(x), rtol=1e-5, atol=1e-6)
    kept = [i for i in range(64) if i not in set(dead1.tolist())]
    torch.testing.assert_close(p.net[0].weight, m.net[0].weight[kept])


@torch.no_grad()
def test_pruning_dead_cnn_channels_keeps_outputs_exactly() -> None:
    m = _cnn()
    g = torch.Generator().manual_seed(2)
    for bn_idx, n in ((1, 16), (4, 32)):
        dead = torch.randperm(n, generator=g)[: n // 2]
        m.net[bn_idx].weight[dead] = 0.0  # BN outputs 0 there, ReLU keeps it 0
        m.net[bn_idx].bias[dead] = 0.0
    m.net[10].weight[:, torch.randperm(64, generator=g)[:32]] = 0.0
    p: Any = prune_structured(m, 0.5)
    assert p.net[0].out_channels == 8 and p.net[1].num_features == 8
    assert p.net[3].in_channels == 8 and p.net[3].out_channels == 16
    assert p.net[4].num_features == 16 and p.net[4].running_mean.shape == (16,)
    assert p.net[8].in_features == 16 * 16 and p.net[8].out_features == 32
    x = torch.rand(20, 64) * 16
    torch.testing.assert_close(p(x), m(x), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_scores_follow_the_stated_criterion() -> None:
    m: Any = ExampleRegressor()
    pair = find_prunable(m)[1]
    w_in = torch.cat([m.net[2].weight, m.net[2].bias[:, None]], dim=1)
    w_out = m.net[4].weight
    torch.testing.assert_close(unit_scores(m, pair, criterion="l2"), w_in.norm(dim=1) * w_out.norm(dim=0))
    torch.testing.assert_close(unit_scores(m, pair, criterion="l1"),
                               w_in.abs().sum(dim=1) * w_out.abs().sum(dim=0))
    with pytest.raises(ConfigError, match="criterion"):
        unit_scores(m, pair, criterion="l3")  # type: ignore[arg-type]


def test_nothing_to_prune_and_branching_outputs_are_refused_or_left_alone() -> None:
    with pytest.raises(ConfigError, match="nothing can be pruned"):
        prune_structured(nn.Sequential(nn.Linear(4, 2)), 0.5)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        prune_structured(ExampleRegressor(), 1.0)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.c(h + self.b(h))  # a's units are read twice (b and the add)

    # the dependency graph prunes a and b together (their units meet in the add)
    assert find_prunable(Residual()) == [PrunePair("a", "b", None, 1)]


def test_magnitude_pruning_zeroes_but_shrinks_nothing() -> None:
    m: Any = ExampleRegressor()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p: Any = prune_magnitude(m, 0.5)
    assert any("no memory" in str(x.message) for x in w)
    assert sum(t.numel() for t in p.parameters()) == sum(t.numel() for t in m.parameters())
    frac = float((p.net[0].weight == 0).float().mean())
    assert 0.45 <= frac <= 0.55


@pytest.mark.slow
def test_pruned_cnn_exports_smaller_and_runs_like_eager(tmp_path: Path) -> None:
    from toma_edge.device.adapter import load_program
    from toma_edge.host.export import export_program

    m = _cnn()
    p = prune_structured(m, 0.5)
    x = torch.rand(32, 64) * 16  # >= 16 rows, see host/compress.py
    full = export_program(m, x, max_batch=32, quantize="fp32")
    small = export_program(p, x, max_batch=32, quantize="fp32")
    assert len(small.pte) <= 0.6 * len(full.pte)
    prog = load_program(small.pte, threads=1)
    rows = (np.random.default_rng(0).random((32, 64)) * 16).astype(np.float32)
    got = prog.run([rows])[0]
    with torch.no_grad():
        want = p(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
