"""The host trainer keeps what is learned while it fits a step into a memory budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from toma_edge import BudgetError
from toma_edge.host.train import MemoryPolicy, TrainSpec, fit_step_to_budget, train_model
from toma_edge.probes import enable_exact_peaks, peak_probe


def _model() -> nn.Sequential:
    torch.manual_seed(3)
    w = 256  # activations (batch x width per block) dominate the step's memory
    return nn.Sequential(
        nn.Sequential(nn.Linear(32, w), nn.ReLU()),
        *[nn.Sequential(nn.Linear(w, w), nn.ReLU()) for _ in range(7)],
        nn.Linear(w, 1),
    )


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.random((768, 32), dtype=np.float32)
    return X, X.sum(axis=1, keepdims=True).astype(np.float32)


def _full_step_rise(model: nn.Module, X: np.ndarray, y: np.ndarray, batch: int) -> int:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    xb, yb = torch.from_numpy(X[:batch]), torch.from_numpy(y[:batch])
    nn.functional.mse_loss(model(xb), yb).backward()  # first-run allocations aside
    with peak_probe().measure() as m:
        nn.functional.mse_loss(model(xb), yb).backward()
    for p in model.parameters():
        p.grad = None
    return m.device_rise_bytes


def test_auto_trainer_reaches_same_weights_when_batch_256_does_not_fit() -> None:
    enable_exact_peaks()
    X, y = _data()
    spec = TrainSpec(task="regression", epochs=2, lr=1e-3, batch_size=256, seed=5)
    free = train_model(_model(), X, y, spec)
    rise = _full_step_rise(_model(), X, y, 256)
    events: list[object] = []
    infos: list[str] = []
    policy = MemoryPolicy(step_budget_bytes=rise // 3, on_event=events.append, on_info=infos.append)
    constrained = train_model(_model(), X, y, spec, memory=policy)
    # the step was adapted (checkpointed and/or split), not run as it is
    assert any("micro-batching" in s or "checkpointing" in s for s in infos), infos
    for a, b in zip(free.parameters(), constrained.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_step_that_fits_is_left_alone() -> None:
    X, y = _data()
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    policy = MemoryPolicy(step_budget_bytes=1 << 34)
    assert fit_step_to_budget(model, nn.MSELoss(), opt, torch.from_numpy(X[:64]),
                              torch.from_numpy(y[:64]), policy) is None


def test_training_budget_already_exceeded_is_clear() -> None:
    X, y = _data()
    spec = TrainSpec(task="regression", epochs=1, batch_size=64)
    with pytest.raises(BudgetError, match="training budget .* already used up"):
        train_model(_model(), X, y, spec, memory=MemoryPolicy(train_budget_bytes=1 << 20))


def test_budget_below_batch_1_fully_checkpointed_names_minimum() -> None:
    enable_exact_peaks()
    X, y = _data()
    rise = _full_step_rise(_model(), X, y, 256)
    spec = TrainSpec(task="regression", epochs=1, batch_size=256)
    with pytest.raises(BudgetError, match="minimum that fits is"):
        train_model(_model(), X, y, spec, memory=MemoryPolicy(step_budget_bytes=max(4096, rise // 50)))
