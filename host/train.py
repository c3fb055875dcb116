"""Training and evaluation for ``build``: plain loops on tensors, cross-validation.

    from toma_edge.host.train import TrainSpec, train_model, evaluate
    spec = TrainSpec(task="regression", epochs=100, lr=1e-3, batch_size=32, seed=0)
    model = train_model(model, X_train, y_train, spec)
    evaluate(lambda x: model(torch.from_numpy(x)).detach().numpy(), X_test, y_test, "regression")

``batch_size`` is the optimisation's batch: it never changes what is learned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

__all__ = [
    "TrainSpec",
    "ProgressFn",
    "train_model",
    "evaluate",
    "kfold_indices",
    "predict_numpy",
    "loss_fn_for",
]

Task = Literal["regression", "classification"]
#: called after every epoch with (epochs done, epochs in all)
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainSpec:
    """What to train: the project's ``train:`` section, resolved."""

    task: Task
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    weight_decay: float = 0.0


def loss_fn_for(task: Task) -> nn.Module:
    return nn.MSELoss() if task == "regression" else nn.CrossEntropyLoss()


def _targets(y: np.ndarray, task: Task) -> torch.Tensor:
    if task == "classification":
        return torch.as_tensor(np.asarray(y).reshape(-1), dtype=torch.int64)
    t = torch.as_tensor(np.asarray(y), dtype=torch.float32)
    return t.reshape(-1, 1) if t.ndim == 1 else t


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def train_model(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    spec: TrainSpec,
    *,
    progress: ProgressFn | None = None,
    step: Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    epochs: int | None = None,
) -> nn.Module:
    """Train ``model`` in place with Adam on shuffled mini-batches; returns it in eval mode.

    ``step`` replaces the default forward/backward of one batch (the TOMA trainer passes
    one that splits the batch into micro-batches and checkpoints within the budget); it
    must leave the batch's mean-loss gradients in ``.grad``.
    """
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    xt = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    yt = _targets(y, spec.task)
    loss_fn = loss_fn_for(spec.task)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    n_epochs = spec.epochs if epochs is None else epochs
    model.train()
    for epoch in range(n_epochs):
        for idx in _batches(len(xt), spec.batch_size, gen):
            xb, yb = xt[idx], yt[idx]
            opt.zero_grad(set_to_none=False)
            if step is None:
                loss = loss_fn(model(xb), yb)
                loss.backward()
            else:
                step(model, xb, yb)
            opt.step()
        if progress is not None:
            progress(epoch + 1, n_epochs)
    model.eval()
    return model


@torch.no_grad()
def predict_numpy(model: nn.Module, X: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    """Eager predictions (raw model outputs) as a float32 numpy array."""
    model.eval()
    outs = []
    for i in range(0, len(X), batch_size):
        outs.append(model(torch.as_tensor(np.asarray(X[i : i + batch_size]), dtype=torch.float32)))
    return torch.cat(outs).numpy().astype(np.float32) if outs else np.zeros((0, 1), np.float32)


def evaluate(
    predict: Callable[[np.ndarray], np.ndarray], X: np.ndarray, y: np.ndarray, task: Task,
    *, prefix: str = "",
) -> dict[str, float]:
    """Regression: rmse and r2; classification: accuracy (in [0, 1]) of the argmax."""
    from sklearn.metrics import accuracy_score, mean_squared_error, r2_score

    out = np.asarray(predict(np.asarray(X, dtype=np.float32)))
    if task == "regression":
        yt = np.asarray(y, dtype=np.float64).reshape(out.shape)
        return {
            f"{prefix}rmse": float(np.sqrt(mean_squared_error(yt, out))),
            f"{prefix}r2": float(r2_score(yt, out)),
        }
    return {f"{prefix}accuracy": float(accuracy_score(np.asarray(y).reshape(-1), out.argmax(axis=1)))}


def kfold_indices(n: int, folds: int, *, seed: int, task: Task, y: np.ndarray | None = None
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index pairs; stratified for classification."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if task == "classification" and y is not None:
        labels = np.asarray(y).reshape(-1)
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() >= folds:
            skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            return [(a, b) for a, b in skf.split(np.zeros(n), labels)]
    kf = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(a, b) for a, b in kf.split(np.zeros(n))]
