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
from typing import TYPE_CHECKING, Literal

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
    import torch

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
        in_backward = failed = False
        rise: int | None = None
        try:
            with peak_probe().measure() as m:
                loss = loss_fn(module(X[i:j]), y[i:j])
                value = float(loss.detach())
                in_backward = True
                (loss * weight).backward()
                del loss
            rise = m.device_rise_bytes if budget_bytes is not None else None
        except BudgetError:
            if plan is None or in_backward:
                raise
            failed = True  # no checkpoint plan fits this micro-batch: try a smaller one
        except Exception as e:
            if not is_oom_error(e):
                raise
            failed = True
        if failed:
            release_after_oom()
            policy.failure(j - i)
            if in_backward:  # part of this micro-batch's gradient is already in .grad
                restarts += 1
                with torch.no_grad():
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.zero_()
                total, i = 0.0, 0
            continue
        passes += 1
        total += value * weight
        if rise is not None:
            top = rise if top is None else max(top, rise)
        policy.success(size, items=j - i, rise_bytes=rise)
        i = j
    optimizer.step()
    return StepResult(total, policy.size, passes, restarts, top)
