"""One optimisation step split into micro-batches that fit a memory budget.

    from toma_edge.accumulate import accumulate_step
    for xb, yb in batches:                                   # the optimisation's batch
        r = accumulate_step(model, torch.nn.functional.mse_loss, opt, xb, yb,
                            budget_bytes=64 << 20)           # same gradients as one pass
        print(r.loss, r.micro_batch)

The micro-batch size comes from the adaptive policy (:mod:`toma_edge.adaptive`): it
shrinks on an out-of-memory error or a measured peak above ``budget_bytes`` and is
cached per ``key`` and input shape, so later steps start at the size found. Each
micro-batch's loss is weighted by its share of the batch, so the accumulated gradient
equals the full batch's (for a mean-reduced loss and layers that do not look across the
batch, such as BatchNorm). An allocator failure during a backward pass has already
added part of a gradient: the step then starts over from zeroed gradients, smaller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .adaptive import AdaptCallback, BatchSizePolicy, is_oom_error, release_after_oom
from .errors import BudgetError
from .probes import peak_probe

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .checkpoint_plan import CheckpointPlan

__all__ = ["accumulate_step", "StepResult", "LossFn"]

LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""``loss_fn(prediction, target) -> scalar tensor``, averaged over the batch."""


@dataclass(frozen=True)
class StepResult:
    """``loss``: the batch's loss (as one pass would give); ``micro_batch``: the size
    used at the end (rows); ``micro_batches``: passes run; ``restarts``: times the step
    started over after a failure in backward; ``peak_rise_bytes``: highest measured rise
    of one micro-batch (None without a budget)."""

    loss: float
    micro_batch: int
    micro_batches: int
    restarts: int
    peak_rise_bytes: int | None


def accumulate_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    budget_bytes: int | None = None,
    micro_batch: int | None = None,
    plan: CheckpointPlan | None = None,
    key: str = "accumulate_step",
    reduction: Literal["mean", "sum"] = "mean",
    on_event: AdaptCallback | None = None,
) -> StepResult:
    """Run forward+backward over ``X, y`` in micro-batches, then ``optimizer.step()``.

    ``budget_bytes``: the peak rise one micro-batch may cause (bytes; None: only react
    to allocator failures). ``micro_batch``: the first size to try (default: the cached
    size, else the whole batch). ``plan``: a checkpoint plan to run the model with.
    ``reduction``: how ``loss_fn`` reduces over rows. Gradients are zeroed in place
    first (``zero_grad(set_to_none=False)``), as the checkpoint budget assumes.
    """
    n = int(X.shape[0])
    if n == 0:
        raise ValueError("empty batch")
    module = plan.apply(model) if plan is not None else model  # type: ignore[arg-type]
    sig = (tuple(X.shape[1:]), str(X.dtype), n)
    policy = BatchSizePolicy(start_size=micro_batch or n, max_size=n,
                             budget_bytes=budget_bytes, site=key, signature=sig,
                             on_event=on_event, grow_after=1 << 30)
    optimizer.zero_grad(set_to_none=False)
    total = 0.0
    passes = restarts = 0
    top: int | None = None
    i = 0
    while i < n:
        size = policy.size
        j = min(n, i + size)
        weight = (j - i) / n if reduction == "mean" else 1.0
        r = _one_pass(module, loss_fn, X[i:j], y[i:j], weight,
                      measure=budget_bytes is not None, smaller_on_budget=plan is not None)
        if not r.ok:
            release_after_oom()
            policy.failure(j - i)
            if r.in_backward:  # part of this micro-batch's gradient is already in .grad
                restarts += 1
                _zero_grads(model)
                total, i = 0.0, 0
            continue
        passes += 1
        total += r.value * weight
        if r.rise is not None:
            top = r.rise if top is None else max(top, r.rise)
        policy.success(size, items=j - i, rise_bytes=r.rise)
        i = j
    optimizer.step()
    return StepResult(total, policy.size, passes, restarts, top)


@dataclass(frozen=True)
class _Pass:
    """One micro-batch's forward and backward: whether it finished, its loss, its measured
    rise (bytes, when measured), and whether a failure came in backward."""

    ok: bool
    value: float = 0.0
    rise: int | None = None
    in_backward: bool = False


def _one_pass(module: Any, loss_fn: LossFn, xb: torch.Tensor, yb: torch.Tensor,
              weight: float, *, measure: bool, smaller_on_budget: bool) -> _Pass:
    """Forward and backward of one micro-batch, its gradient added to ``.grad``. An
    out-of-memory error (or, with a checkpoint plan, a BudgetError before backward: no plan
    fits this size) is a failed pass; anything else propagates."""
    in_backward = False
    try:
        with peak_probe().measure() as m:
            loss = loss_fn(module(xb), yb)
            value = float(loss.detach())
            in_backward = True
            (loss * weight).backward()
            del loss
    except BudgetError:
        if not smaller_on_budget or in_backward:
            raise
        return _Pass(False, in_backward=in_backward)
    except Exception as e:
        if not is_oom_error(e):
            raise
        return _Pass(False, in_backward=in_backward)
    return _Pass(True, value, m.device_rise_bytes if measure else None)


def _zero_grads(model: nn.Module) -> None:
    """Zero every parameter's gradient in place (a restarted step starts from nothing)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
