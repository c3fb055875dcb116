"""Training and evaluation for ``build``: plain loops on tensors, cross-validation.

    from toma_edge.host.train import TrainSpec, train_model, evaluate
    spec = TrainSpec(task="regression", epochs=100, lr=1e-3, batch_size=32, seed=0)
    model = train_model(model, X_train, y_train, spec)
    evaluate(lambda x: model(torch.from_numpy(x)).detach().numpy(), X_test, y_test, "regression")

``batch_size`` is the optimisation's batch: it never changes what is learned.

``X`` may also be a :class:`~toma_edge.host.training_data.TrainingData` (then ``y`` is
None): an in-memory one trains exactly as its arrays would; a file-backed one is read
through a BudgetedLoader whose share of the training budget is :func:`loader_budget_bytes`
(a quarter of what the budget leaves above the process's RSS when training starts, at
most 256 MiB; 64 MiB without a training budget), and that share is taken off what one
step may use. Cross-validation folds are ``data.subset(idx)``; :func:`evaluate_data`
scores a fold by streaming it, so the metrics cover every row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from ..project import TrainConfig
    from .training_data import TrainingData

__all__ = [
    "TrainSpec",
    "MemoryPolicy",
    "fit_step_to_budget",
    "ProgressFn",
    "train_model",
    "evaluate",
    "evaluate_data",
    "loader_budget_bytes",
    "kfold_indices",
    "predict_numpy",
    "loss_fn_for",
    "ThreadChoice",
    "fastest_threads",
    "adam",
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

    @classmethod
    def from_config(cls, config: TrainConfig, task: Task) -> TrainSpec:
        """The project's ``train:`` section as a spec (its memory keys go to MemoryPolicy)."""
        return cls(task=task, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                   seed=config.seed, weight_decay=config.weight_decay)


@dataclass(frozen=True)
class MemoryPolicy:
    """How training stays inside a memory budget (the project's ``train:`` memory keys).

    ``train_budget_bytes``: peak RSS of the whole training process (or the CUDA peak).
    ``step_budget_bytes``: overrides what one forward+backward may add (bytes); by
    default it is the training budget less what the process holds with parameters,
    gradients and optimizer state allocated. ``micro_batch``: ``"auto"`` lets the adaptive
    policy split a batch that does not fit into micro-batches (gradient accumulation),
    an int fixes the first micro-batch size. ``checkpointing``: ``"auto"`` plans
    budget-driven checkpointing for models that are an ``nn.Sequential`` of blocks.
    """

    train_budget_bytes: int | None = None
    step_budget_bytes: int | None = None
    micro_batch: int | Literal["auto"] = "auto"
    checkpointing: bool | Literal["auto", "off"] = "auto"
    on_event: Callable[[object], None] | None = None
    on_info: Callable[[str], None] | None = None


Update = Callable[[torch.Tensor, torch.Tensor], None]


def _optimizer_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes the optimizer will still allocate at its first step (Adam: two moments)."""
    if any(opt.state.values()):
        return 0
    per = 2 if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) else 1
    return per * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def fit_step_to_budget(
    model: nn.Module,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    xb: torch.Tensor,
    yb: torch.Tensor,
    policy: MemoryPolicy,
) -> Update | None:
    """Decide how one optimisation step on batches like ``xb`` stays in budget.

    Measures one forward+backward at the full batch (RNG state and gradients restored,
    so what is learned does not change). Returns None when it fits as it is, else an
    update function that checkpoints (planned within the step budget) and/or splits the
    batch into micro-batches whose gradients add up to the full batch's. Raises
    BudgetError when even batch 1 with every block checkpointed cannot fit.
    """
    from ..accumulate import accumulate_step
    from ..budget import format_size
    from ..errors import BudgetError
    from ..probes import peak_probe, rss_bytes

    if policy.train_budget_bytes is None and policy.step_budget_bytes is None:
        return None
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    if policy.step_budget_bytes is not None:
        step_budget = policy.step_budget_bytes
    else:
        assert policy.train_budget_bytes is not None
        held = rss_bytes() + _optimizer_state_bytes(model, opt)
        step_budget = policy.train_budget_bytes - held
        if step_budget <= 0:
            raise BudgetError(
                f"the training budget {format_size(policy.train_budget_bytes)} is already used up "
                f"by the process before any step ({format_size(held)} with parameters, gradients "
                f"and optimizer state); raise --train-budget above {format_size(held + (64 << 20))}"
            )
    rng = torch.get_rng_state()
    try:
        with peak_probe().measure() as m:
            loss_fn(model(xb), yb).backward()
    finally:
        torch.set_rng_state(rng)
        opt.zero_grad(set_to_none=False)
    rise = m.device_rise_bytes
    if rise <= step_budget:
        return None

    info = policy.on_info or (lambda _msg: None)
    plan = None
    if policy.checkpointing in ("auto", True) and isinstance(model, nn.Sequential):
        from ..checkpoint_plan import plan_checkpointing

        try:
            plan = plan_checkpointing(model, xb, budget=step_budget)
            info(f"checkpointing segments {plan.segments} "
                 f"to fit one step in {format_size(step_budget)}")
        except BudgetError:
            plan = None
    mb = policy.micro_batch
    if plan is None and mb not in ("auto",) and not isinstance(mb, int):
        raise BudgetError(
            f"one step at batch {len(xb)} needs {format_size(rise)} but the budget leaves "
            f"{format_size(step_budget)}; allow train.micro_batch: auto"
        )
    if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
        import warnings

        warnings.warn(
            "splitting batches of a model with BatchNorm: its statistics see micro-batches, "
            "so what is learned changes slightly", stacklevel=2,
        )
    if plan is None and isinstance(model, nn.Sequential) and policy.checkpointing in ("auto", True):
        # micro-batches of a Sequential also get checkpointed: plan at batch 1, the
        # planned module re-plans itself for the micro-batch size it sees
        from ..checkpoint_plan import plan_checkpointing

        try:
            plan = plan_checkpointing(model, xb[:1], budget=step_budget)
        except BudgetError as e:
            raise BudgetError(f"the training step cannot fit even at batch 1 with every block "
                              f"checkpointed: {e}") from e
    first = policy.micro_batch if isinstance(policy.micro_batch, int) else None
    info(f"one step at batch {len(xb)} needs {format_size(rise)}, over the "
         f"{format_size(step_budget)} step budget: micro-batching")

    def update(x: torch.Tensor, y: torch.Tensor) -> None:
        accumulate_step(model, loss_fn, opt, x, y, budget_bytes=step_budget, micro_batch=first,
                        plan=plan, key=f"train:{id(model)}", on_event=policy.on_event)  # type: ignore[arg-type]

    return update


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


#: the loader's share of the training budget left above the process's RSS at the start
LOADER_SHARE = 0.25
LOADER_MAX_BYTES = 256 << 20
LOADER_DEFAULT_BYTES = 64 << 20


def loader_budget_bytes(memory: MemoryPolicy | None) -> int:
    """Bytes a file-backed training loader may hold (chunks in flight and prefetched).

    A quarter of what the training budget leaves above the process's RSS now, at most
    256 MiB; 64 MiB when there is no training budget. BudgetError when nothing is left.
    """
    from ..budget import format_size
    from ..errors import BudgetError
    from ..probes import rss_bytes

    if memory is None or memory.train_budget_bytes is None:
        return LOADER_DEFAULT_BYTES
    left = memory.train_budget_bytes - rss_bytes()
    if left <= 0:
        raise BudgetError(
            f"the training budget {format_size(memory.train_budget_bytes)} is already used up "
            f"before training starts (RSS {format_size(rss_bytes())}); raise --train-budget"
        )
    return int(min(LOADER_MAX_BYTES, left * LOADER_SHARE))


def train_model(
    model: nn.Module,
    X: np.ndarray | TrainingData,
    y: np.ndarray | None,
    spec: TrainSpec,
    *,
    progress: ProgressFn | None = None,
    memory: MemoryPolicy | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    epochs: int | None = None,
) -> nn.Module:
    """Train ``model`` in place with Adam on shuffled mini-batches; returns it in eval mode.

    With ``memory``, the first batch is measured against the budget: a step that does
    not fit is checkpointed and/or split into micro-batches (gradient accumulation), so
    ``spec.batch_size`` stays the optimisation's batch and what is learned does not
    change (up to float rounding; BatchNorm statistics excepted, with a warning).
    ``X`` may be a TrainingData (``y`` None); a file-backed one never loads all its rows.
    """
    from .training_data import ArrayData, TrainingData

    if isinstance(X, ArrayData):
        X, y = X.arrays()
    elif isinstance(X, TrainingData):
        return _train_from_loader(model, X, spec, progress=progress, memory=memory,
                                  optimizer=optimizer, epochs=epochs)
    assert y is not None, "train_model: y is None but X is an array"
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    xt = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    yt = _targets(y, spec.task)
    loss_fn = loss_fn_for(spec.task)
    opt = optimizer or adam(model, spec)
    n_epochs = spec.epochs if epochs is None else epochs
    model.train()
    update: Update | None = None
    if memory is not None and len(xt):
        b = min(spec.batch_size, len(xt))
        update = fit_step_to_budget(model, loss_fn, opt, xt[:b], yt[:b], memory)

    def epoch_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in _batches(len(xt), spec.batch_size, gen):
            yield xt[idx], yt[idx]

    return _run_epochs(model, epoch_batches, loss_fn, opt, update, n_epochs, progress)


def adam(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """Build's optimiser: Adam with the spec's learning rate and weight decay, fused into
    one kernel where torch offers it for the parameters (a third faster per step on a
    small model, where a step is mostly optimiser overhead), else the default."""
    params = list(model.parameters())
    try:
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel lacks
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _run_epochs(
    model: nn.Module,
    epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    update: Update | None,
    n_epochs: int,
    progress: ProgressFn | None,
) -> nn.Module:
    """The optimisation loop both data kinds share: one step per batch, plain or through
    the budget-fitting ``update``; returns the model in eval mode."""
    for epoch in range(n_epochs):
        for xb, yb in epoch_batches():
            if update is None:
                opt.zero_grad(set_to_none=False)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
            else:
                update(xb, yb)
            del xb, yb
        if progress is not None:
            progress(epoch + 1, n_epochs)
    model.eval()
    return model


def _train_from_loader(
    model: nn.Module,
    data: TrainingData,
    spec: TrainSpec,
    *,
    progress: ProgressFn | None,
    memory: MemoryPolicy | None,
    optimizer: torch.optim.Optimizer | None,
    epochs: int | None,
) -> nn.Module:
    """train_model over a file-backed TrainingData: block-shuffled batches from a loader."""
    torch.manual_seed(spec.seed)
    loss_fn = loss_fn_for(spec.task)
    opt = optimizer or adam(model, spec)
    n_epochs = spec.epochs if epochs is None else epochs
    loader = data.loader(spec.batch_size, budget_bytes=loader_budget_bytes(memory), seed=spec.seed)
    model.train()
    update: Update | None = None
    if memory is not None and data.rows:
        held = getattr(loader, "plan", None)
        if memory.train_budget_bytes is not None and held is not None:
            # what the loader may hold is not there yet when the first step is measured
            memory = replace(memory,
                             train_budget_bytes=memory.train_budget_bytes - held.in_flight_bytes)
        xh, yh = data.head(min(spec.batch_size, data.rows))
        update = fit_step_to_budget(model, loss_fn, opt, torch.as_tensor(xh, dtype=torch.float32),
                                    _targets(yh, spec.task), memory)
        del xh, yh

    def epoch_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xn, yn in loader:
            yield torch.as_tensor(xn, dtype=torch.float32), _targets(yn, spec.task)

    return _run_epochs(model, epoch_batches, loss_fn, opt, update, n_epochs, progress)


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
    acc = accuracy_score(np.asarray(y).reshape(-1), out.argmax(axis=1))
    return {f"{prefix}accuracy": float(acc)}


def evaluate_data(
    predict: Callable[[np.ndarray], np.ndarray], data: TrainingData, task: Task, *,
    prefix: str = "", batch_size: int = 4096, budget_bytes: int = LOADER_DEFAULT_BYTES,
) -> dict[str, float]:
    """:func:`evaluate` over a TrainingData: in memory as before, a file-backed one streamed.

    Streaming gives the same figures over every row: rmse and r2 (the mean over outputs,
    as sklearn's uniform average) from running sums, accuracy from a running count.
    """
    from .training_data import ArrayData

    if isinstance(data, ArrayData):
        X, y = data.arrays()
        return evaluate(predict, X, y, task, prefix=prefix)
    n = correct = 0
    sse = sy = syy = None
    row_bytes = int(getattr(data, "row_bytes", 0)) or 1
    batch_size = max(1, min(batch_size, budget_bytes // (16 * row_bytes)))  # 4 batches a chunk
    for xb, yb in data.loader(batch_size, budget_bytes=budget_bytes, shuffle=False):
        out = np.asarray(predict(np.asarray(xb, dtype=np.float32)))
        n += len(out)
        if task == "regression":
            yt = np.asarray(yb, dtype=np.float64).reshape(out.shape)
            e = ((yt - out) ** 2).sum(axis=0)
            sse = e if sse is None else sse + e
            sy = yt.sum(axis=0) if sy is None else sy + yt.sum(axis=0)
            syy = (yt ** 2).sum(axis=0) if syy is None else syy + (yt ** 2).sum(axis=0)
        else:
            correct += int((out.argmax(axis=1) == np.asarray(yb).reshape(-1)).sum())
    if task == "regression":
        assert sse is not None and sy is not None and syy is not None and n
        sst = syy - sy ** 2 / n
        r2 = np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), 0.0)
        return {f"{prefix}rmse": float(np.sqrt(sse.sum() / (n * len(sse)))),
                f"{prefix}r2": float(r2.mean())}
    return {f"{prefix}accuracy": correct / max(1, n)}


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


#: the intra-op thread count torch chose at import (OMP_NUM_THREADS or the core count)
_MAX_THREADS = torch.get_num_threads()


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count a training step ran fastest on, and each count's step time (ms)."""

    threads: int
    step_ms: dict[int, float]

    def describe(self) -> str:
        times = ", ".join(f"{n}: {ms:.2f} ms" for n, ms in sorted(self.step_ms.items()))
        return f"training on {self.threads} thread(s) (one step measured here, now: {times})"


def fastest_threads(model: nn.Module, X: np.ndarray, y: np.ndarray, spec: TrainSpec, *,
                    candidates: Iterable[int] | None = None) -> ThreadChoice:
    """The intra-op thread count that runs one training step of ``model`` on a batch of
    ``X`` fastest on this machine now, among ``candidates`` (default: 1 and the count torch
    started with). A tiny model spends a step in Python and in synchronising threads, so on
    a shared 2-core machine one thread is often faster, and far faster when another process
    is busy; a large one gains from every core. Measured on a copy (the model is not
    trained): one warm-up step, then the median of the steps that fit in 0.15 s (at least
    one). More threads must be 10% faster to be chosen."""
    import copy
    import time

    counts = sorted(set(candidates) if candidates is not None else {1, _MAX_THREADS})
    before = torch.get_num_threads()
    if len(counts) == 1 or len(X) == 0:
        return ThreadChoice(counts[0], {})
    m = copy.deepcopy(model).train()
    opt = torch.optim.Adam(m.parameters(), lr=0.0)  # build's optimiser; lr 0: weights stay
    loss_fn = loss_fn_for(spec.task)
    b = min(spec.batch_size, len(X))
    xb = torch.as_tensor(np.asarray(X[:b]), dtype=torch.float32)
    yb = _targets(np.asarray(y[:b]), spec.task)
    times: dict[int, float] = {}
    try:
        for n in counts:
            torch.set_num_threads(n)
            runs: list[float] = []
            start = time.perf_counter()
            # a warm-up step, then the steps that fit in 0.15 s (a big model whose step
            # takes longer: one measured step)
            for i in range(1000):
                t = time.perf_counter()
                opt.zero_grad()
                loss_fn(m(xb), yb).backward()
                opt.step()
                if i:
                    runs.append(time.perf_counter() - t)
                if runs and time.perf_counter() - start > 0.15:
                    break
            times[n] = float(np.median(runs) * 1e3)
    finally:
        torch.set_num_threads(before)
    best = counts[0]
    for n in counts[1:]:
        if times[n] < 0.9 * times[best]:
            best = n
    return ThreadChoice(best, times)
