"""Budget-driven gradient checkpointing for an ``nn.Sequential`` of blocks.

    import torch, toma_edge
    block = lambda: torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU())
    model = torch.nn.Sequential(*[block() for _ in range(24)])
    plan = toma_edge.plan_checkpointing(model, torch.randn(2048, 512), budget="64MiB")
    print(plan.segments, plan.predicted_peak_bytes)  # [(3, 5), ...] recomputed ranges, bytes
    fast = plan.apply(model)                         # same Parameters, same gradients

``budget`` bounds the peak rise of memory during one forward+backward above what is
held just before the forward, with parameters, gradients (zeroed in place, not None)
and optimizer state already allocated. The planner

1. runs the model once and records, per block, the storages saved for backward
   (``torch.autograd.graph.saved_tensors_hooks``; a storage shared between blocks, such
   as one block's output that the next block saves as its input, counts once), the
   largest temporary and the forward time (seconds);
2. calibrates that model against the peak measured by :mod:`toma_edge.probes`;
3. chooses the checkpointed segments by dynamic programming over contiguous segments,
   least recompute time whose predicted peak fits the budget;
4. applies the plan with ``torch.utils.checkpoint`` (``use_reentrant=False``), measures
   the real peak, and plans again with the excess added when it is above the budget.

A budget that no plan meets raises :class:`toma_edge.BudgetError` naming the minimum.
The planned module re-plans by itself (from the recorded costs, scaled, without a new
measurement) when it sees another batch size.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .budget import format_size, parse_size
from .errors import BudgetError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["plan_checkpointing", "CheckpointPlan", "BlockCost"]

log = logging.getLogger(__name__)

# fixed cost of one checkpoint call (s): makes fewer, longer segments win ties
_SEGMENT_OVERHEAD_S = 50e-6
# a verified plan leaves this fraction of the budget free for measurement noise
_VERIFY_MARGIN = 0.02


@dataclass(frozen=True)
class BlockCost:
    """What block ``index`` costs, measured at the plan's batch size.

    ``saved`` maps storage keys to bytes saved for backward (parameters and the model's
    input excluded, they are held anyway); ``in_key``/``out_key`` are the storages of
    its input and output; ``grad_bytes`` the extra memory its backward needs on top of
    the saved tensors (incoming and outgoing gradients, the largest temporary,
    parameter gradients before they are added in place); ``forward_s`` its forward
    time in seconds. ``param_bytes`` is the part of ``grad_bytes`` that does not scale
    with the batch.
    """

    index: int
    saved: dict[int, int]
    in_key: int
    out_key: int
    out_bytes: int
    grad_bytes: int
    param_bytes: int
    forward_s: float
    temp_bytes: int = 0


@dataclass(frozen=True)
class CheckpointPlan:
    """Which blocks to recompute, and what memory that is predicted to need.

    ``segments``: the half-open ``(start, stop)`` block ranges that are checkpointed
    (recomputed during backward). ``predicted_peak_bytes``: predicted peak rise of one
    forward+backward with the plan (bytes). ``measured_peak_bytes``: the rise measured
    when the plan was verified (bytes; None if not verified). ``recompute_s``: the
    predicted extra forward time per step (seconds). ``min_budget_bytes``: the
    smallest budget any plan meets at this batch size.
    """

    segments: tuple[tuple[int, int], ...]
    predicted_peak_bytes: int
    budget_bytes: int
    batch_size: int
    recompute_s: float
    no_checkpoint_peak_bytes: int
    min_budget_bytes: int
    measured_peak_bytes: int | None = None
    blocks: tuple[BlockCost, ...] = field(default=(), repr=False)
    correction_bytes: int = field(default=0, repr=False)

    def apply(self, model: nn.Sequential) -> nn.Module:
        """A new module over ``model``'s own blocks (same Parameters) running this plan.

        ``model`` itself is left unchanged. The result computes the same outputs and
        gradients; batches of another size get a plan scaled to them.
        """
        return _planned_cls()(model, self)  # type: ignore[no-any-return]

    def for_batch(self, batch_size: int) -> CheckpointPlan:
        """This plan re-solved for ``batch_size`` from the recorded costs (scaled)."""
        if batch_size == self.batch_size or not self.blocks:
            return self
        s = batch_size / self.batch_size
        blocks = tuple(_scale_block(b, s) for b in self.blocks)
        corr = int(self.correction_bytes * s)
        return _solve(blocks, self.budget_bytes, batch_size, corr)

    def describe(self) -> str:
        """One line for logs and the CLI."""
        segs = ", ".join(f"[{a},{b})" for a, b in self.segments) or "none"
        meas = (f", measured {format_size(self.measured_peak_bytes)}"
                if self.measured_peak_bytes is not None else "")
        return (f"checkpoint {segs}: predicted {format_size(self.predicted_peak_bytes)}"
                f"{meas} of {format_size(self.budget_bytes)}, recompute "
                f"{self.recompute_s * 1e3:.1f} ms/step")


def _scale_block(b: BlockCost, s: float) -> BlockCost:
    return replace(
        b,
        saved={k: int(v * s) for k, v in b.saved.items()},
        out_bytes=int(b.out_bytes * s),
        temp_bytes=int(b.temp_bytes * s),
        grad_bytes=b.param_bytes + int((b.grad_bytes - b.param_bytes) * s),
        forward_s=b.forward_s * s,
    )


def _import_torch() -> Any:
    import torch

    return torch


_PLANNED: Any = None


def _planned_cls() -> Any:
    global _PLANNED
    if _PLANNED is not None:
        return _PLANNED
    torch = _import_torch()
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    class _PlannedSequential(nn.Module):
        """Runs an nn.Sequential's blocks with some segments checkpointed."""

        def __init__(self, model: nn.Sequential, plan: CheckpointPlan) -> None:
            super().__init__()
            # the same block objects: same Parameters, model untouched
            self.blocks = nn.ModuleList(list(model.children()))
            self.plan = plan
            self._plans: dict[int, CheckpointPlan] = {plan.batch_size: plan}

        def _plan_for(self, batch: int) -> CheckpointPlan:
            p = self._plans.get(batch)
            if p is None:
                p = self.plan.for_batch(batch)
                log.info("batch size %d: re-planned %s", batch, p.describe())
                self._plans[batch] = p
            return p

        @staticmethod
        def _run(blocks: Sequence[nn.Module], h: Any) -> Any:
            for blk in blocks:
                h = blk(h)
            return h

        def forward(self, x: Any) -> Any:
            batch = int(x.shape[0]) if x.dim() > 0 else 1
            plan = self._plan_for(batch) if torch.is_grad_enabled() else self.plan
            seg_at = {a: b for a, b in plan.segments} if torch.is_grad_enabled() else {}
            i, n, h = 0, len(self.blocks), x
            while i < n:
                stop = seg_at.get(i)
                if stop is None:
                    h = self.blocks[i](h)
                    i += 1
                else:
                    part = list(self.blocks[i:stop])
                    h = checkpoint(self._run, part, h, use_reentrant=False)
                    i = stop
            return h

        def extra_repr(self) -> str:
            return self.plan.describe()

    _PLANNED = _PlannedSequential
    return _PLANNED


# -- measuring --------------------------------------------------------------------------


def _storage_key(t: Any) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    n = int(st.nbytes())
    ptr = int(st.data_ptr())
    if n == 0 or ptr == 0:
        return None
    return ptr, n


def _measure_blocks(blocks: list[nn.Module], x: torch.Tensor, *, repeats: int
                    ) -> tuple[list[BlockCost], torch.Tensor]:
    torch = _import_torch()
    from torch.utils._python_dispatch import TorchDispatchMode

    held: set[int] = set()
    for blk in blocks:
        for p in blk.parameters():
            k = _storage_key(p)
            if k:
                held.add(k[0])
        for b in blk.buffers():
            k = _storage_key(b)
            if k:
                held.add(k[0])
    k0 = _storage_key(x)
    if k0:
        held.add(k0[0])

    class _Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size())
            return out

    costs: list[BlockCost] = []
    h = x
    for i, blk in enumerate(blocks):
        saved: dict[int, int] = {}

        def pack(t: Any, saved: dict[int, int] = saved) -> Any:
            k = _storage_key(t)
            if k is not None and k[0] not in held:
                saved[k[0]] = k[1]
            return t

        in_k = _storage_key(h)
        mode = _Largest()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
            out = blk(h)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"block {i} returns {type(out).__name__}; the checkpoint "
                              "planner needs blocks that map one tensor to one tensor")
        out_k = _storage_key(out)
        out_bytes = out_k[1] if out_k else 0
        in_bytes = in_k[1] if in_k and in_k[0] not in held else (in_k[1] if in_k else 0)
        params = sum(p.numel() * p.element_size() for p in blk.parameters() if p.requires_grad)
        # backward of this block: incoming grad (output sized), the largest internal
        # gradient, the outgoing grad (input sized), new parameter grads before the
        # in-place add into .grad
        grad_bytes = max(out_bytes, mode.largest) + in_bytes + params
        times = []
        with torch.enable_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                blk(h)
                times.append(time.perf_counter() - t0)
        costs.append(BlockCost(i, saved, in_k[0] if in_k else -1 - i,
                               out_k[0] if out_k else -2 - i, out_bytes, grad_bytes,
                               params, statistics.median(times), max(out_bytes, mode.largest)))
        h = out
    return costs, h


# -- predicting -------------------------------------------------------------------------


def _predict(blocks: Sequence[BlockCost], segments: Sequence[tuple[int, int]]) -> int:
    """Exact union-of-storages prediction of the peak rise of forward+backward (bytes)."""
    n = len(blocks)
    seg_at = {a: b for a, b in segments}
    groups: list[tuple[int, int, bool]] = []
    i = 0
    while i < n:
        if i in seg_at:
            groups.append((i, seg_at[i], True))
            i = seg_at[i]
        else:
            groups.append((i, i + 1, False))
            i += 1
    sizes: dict[int, int] = {}
    for blk in blocks:
        sizes.update(blk.saved)
        sizes.setdefault(blk.in_key, 0)
        sizes[blk.out_key] = max(sizes.get(blk.out_key, 0), blk.out_bytes)

    def retained(g: tuple[int, int, bool]) -> set[int]:
        a, _, ck = g
        return {blocks[a].in_key} if ck else set(blocks[a].saved)

    def nbytes(keys: set[int]) -> int:
        return sum(sizes.get(k, 0) for k in keys)

    prefix: list[set[int]] = [set()]
    for g in groups:
        prefix.append(prefix[-1] | retained(g))
    out_key = blocks[-1].out_key
    peak = nbytes(prefix[-1] | {out_key})
    for gi in range(len(groups) - 1, -1, -1):
        a, b, ck = groups[gi]
        base = prefix[gi]
        if not ck:
            peak = max(peak, nbytes(base | set(blocks[a].saved)) + blocks[a].grad_bytes)
            continue
        seg = base | retained(groups[gi])
        cum = [set(seg)]
        for j in range(a, b):
            cum.append(cum[-1] | set(blocks[j].saved))
        # the recompute itself: every saved tensor of the segment, the incoming
        # gradient and the recomputed output alive at once
        peak = max(peak, nbytes(cum[-1]) + _recompute_extra(blocks[b - 1]))
        for j in range(b - 1, a - 1, -1):
            peak = max(peak, nbytes(cum[j - a + 1]) + blocks[j].grad_bytes)
    return peak


def _recompute_extra(last: BlockCost) -> int:
    return last.out_bytes + max(last.out_bytes, last.temp_bytes)


def _solve_dp(blocks: Sequence[BlockCost], budget: float, keep: int = 48
              ) -> tuple[tuple[tuple[int, int], ...], float] | None:
    """Least recompute time whose (additive, conservative) peak fits ``budget``."""
    n = len(blocks)
    if n == 0:
        return (), 0.0
    sizes: dict[int, int] = {}
    for blk in blocks:
        sizes.update(blk.saved)
    saved_b = [sum(blk.saved.values()) for blk in blocks]
    # h_j, the input of block j, which a checkpoint starting at j keeps (h_0 is held)
    in_b = [0] + [blocks[j - 1].out_bytes for j in range(1, n)]
    cum_fwd = [0.0]
    for blk in blocks:
        cum_fwd.append(cum_fwd[-1] + blk.forward_s)
    overlap = [0] * n  # bytes block j-1 (plain) and block j (plain) both save
    hj_prev = [0] * n  # bytes of h_j that a plain block j-1 already keeps
    for j in range(1, n):
        common = set(blocks[j - 1].saved) & set(blocks[j].saved)
        overlap[j] = sum(sizes[k] for k in common)
        hj_prev[j] = blocks[j - 1].saved.get(blocks[j].in_key, 0)
    # local[a][b]: peak inside checkpointed segment [a, b) above the memory before it
    local: list[dict[int, int]] = [dict() for _ in range(n)]
    for a in range(n):
        cum: set[int] = set()
        cum_b = 0
        top = 0
        for j in range(a, n):
            for k, v in blocks[j].saved.items():
                if k not in cum and k != blocks[a].in_key:
                    cum.add(k)
                    cum_b += v
            top = max(top, cum_b + blocks[j].grad_bytes)
            local[a][j + 1] = max(top, cum_b + _recompute_extra(blocks[j]))
    # states[j][prev_plain] = Pareto list of (retained_bytes, cost, segments)
    State = tuple[int, float, tuple[tuple[int, int], ...]]
    states: list[dict[bool, list[State]]] = [{False: [], True: []} for _ in range(n + 1)]
    states[0][False] = [(0, 0.0, ())]
    for j in range(n):
        for prev_plain in (False, True):
            for P, cost, segs in states[j][prev_plain]:
                # plain block j
                add = saved_b[j] - (overlap[j] if prev_plain else 0)
                if P + add + blocks[j].grad_bytes <= budget:
                    states[j + 1][True].append((P + add, cost, segs))
                # checkpointed segment [j, b)
                keep_in = 0 if (prev_plain and hj_prev[j]) or j == 0 else in_b[j]
                for b in range(j + 1, n + 1):
                    if P + keep_in + local[j][b] > budget:
                        break  # longer segments only need more
                    c = cost + cum_fwd[b] - cum_fwd[j] + _SEGMENT_OVERHEAD_S
                    states[b][False].append((P + keep_in, c, (*segs, (j, b))))
        for flag in (False, True):
            states[j + 1][flag] = _pareto(states[j + 1][flag], keep)
    out_b = blocks[-1].out_bytes
    best: State | None = None
    for flag in (False, True):
        for P, cost, segs in states[n][flag]:
            if P + out_b <= budget and (best is None or cost < best[1]):
                best = (P, cost, segs)
    if best is None:
        return None
    return best[2], best[1]


def _pareto(points: list[Any], keep: int) -> list[Any]:
    points.sort(key=lambda p: (p[0], p[1]))
    out: list[Any] = []
    best_cost = math.inf
    for p in points:
        if p[1] < best_cost - 1e-12:
            out.append(p)
            best_cost = p[1]
    if len(out) > keep:  # thin evenly, always keeping both ends
        step = (len(out) - 1) / (keep - 1)
        out = [out[round(i * step)] for i in range(keep)]
    return out


def _feasible(blocks: Sequence[BlockCost], budget: float
              ) -> tuple[tuple[tuple[int, int], ...], float] | None:
    """DP under ``budget``, then the exact prediction must agree; tighten if not."""
    target = budget
    for _ in range(4):
        r = _solve_dp(blocks, target)
        if r is None:
            return None
        if _predict(blocks, r[0]) <= budget:
            return r
        target -= _predict(blocks, r[0]) - budget  # the additive model was optimistic
    return None


def _min_budget(blocks: Sequence[BlockCost], hi: int) -> int:
    """Smallest budget (bytes) for which some plan is predicted to fit (1% precision)."""
    lo = 0
    if _feasible(blocks, hi) is None:
        hi *= 2
        while _feasible(blocks, hi) is None:
            hi *= 2
    while hi - lo > max(4096, hi // 200):
        mid = (lo + hi) // 2
        if _feasible(blocks, mid) is None:
            lo = mid
        else:
            hi = mid
    return hi


def _solve(blocks: Sequence[BlockCost], budget: int, batch: int, correction: int
           ) -> CheckpointPlan:
    none_peak = _predict(blocks, ()) + correction
    r = _feasible(blocks, budget - correction)
    if r is None:
        min_b = _min_budget(blocks, max(1, none_peak - correction)) + correction
        raise BudgetError(_too_small(budget, min_b, batch))
    segs, rec = r
    min_b = _min_budget(blocks, max(1, _predict(blocks, segs))) + correction
    return CheckpointPlan(
        segments=tuple(segs),
        predicted_peak_bytes=_predict(blocks, segs) + correction,
        budget_bytes=budget,
        batch_size=batch,
        recompute_s=rec,
        no_checkpoint_peak_bytes=none_peak,
        min_budget_bytes=min_b,
        blocks=tuple(blocks),
        correction_bytes=correction,
    )


def _too_small(budget: int, min_b: int, batch: int) -> str:
    per_row = max(1, math.ceil(min_b / max(1, batch)))
    return (f"training budget {format_size(budget)} is too small for one forward+backward "
            f"at batch {batch} even with checkpointing; the minimum that fits is "
            f"{format_size(min_b)} (about {format_size(per_row)} per row at smaller "
            "batches); raise the budget or lower the batch size")


# -- verifying ------------------------------------------------------------------------


def _grads_ready(params: list[Any]) -> list[Any]:
    torch = _import_torch()
    old = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    return old


def _measured_rise(module: Any, x: Any) -> int:
    from .probes import measure_peak

    with measure_peak() as m:
        out = module(x)
        out.float().sum().backward()
        del out
    return m.rise_bytes


def plan_checkpointing(
    model: nn.Sequential,
    example_inputs: Any,
    *,
    budget: int | str,
    verify: bool = True,
    repeats: int = 3,
) -> CheckpointPlan:
    """Choose which blocks of ``model`` to recompute so one step fits ``budget``.

    ``model``: an ``nn.Sequential`` whose children are the blocks. ``example_inputs``:
    a batch (a tensor, or a 1-tuple) of the size the plan is for. ``budget``: bytes, or
    a size string like ``"96MiB"``; the peak rise of one forward+backward above what is
    held before it. ``verify``: apply the plan, measure the real peak with the
    process-wide probe and plan again with the excess when it is over. ``repeats``:
    forward timings per block (the median is used).

    Leaves ``model``'s gradients as they were. Raises :class:`BudgetError` naming the
    minimum budget when none fits.
    """
    torch = _import_torch()
    from torch import nn

    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"plan_checkpointing needs an nn.Sequential of blocks, got "
                          f"{type(model).__name__}; wrap the blocks in nn.Sequential")
    x = example_inputs
    if isinstance(x, (tuple, list)):
        if len(x) != 1:
            raise ConfigError("an nn.Sequential takes one input; pass one tensor")
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"example_inputs must be a tensor, got {type(x).__name__}")
    budget_b = parse_size(budget)
    blocks = list(model.children())
    if not blocks:
        raise ConfigError("the model has no blocks to plan")
    batch = int(x.shape[0]) if x.dim() > 0 else 1
    params = [p for p in model.parameters() if p.requires_grad]
    old_grads = _grads_ready(params)
    try:
        with torch.enable_grad():
            costs, out = _measure_blocks(blocks, x, repeats=repeats)
            del out
            correction = 0
            if verify:
                predicted_none = _predict(costs, ())
                measured_none = _measured_rise(model, x)
                # our model leaves out allocator slack and the loss; never subtract
                correction = max(0, measured_none - predicted_none)
            plan = _solve(costs, budget_b, batch, correction)
            if verify:
                margin = int(budget_b * _VERIFY_MARGIN)
                for _ in range(4):
                    measured = _measured_rise(plan.apply(model), x)
                    plan = replace(plan, measured_peak_bytes=measured)
                    if measured <= budget_b:
                        break
                    correction += measured - plan.predicted_peak_bytes + margin
                    log.info("measured %s over budget %s: re-planning", format_size(measured),
                             format_size(budget_b))
                    plan = _solve(costs, budget_b, batch, correction)
                else:
                    raise BudgetError(
                        f"measured peak {format_size(plan.measured_peak_bytes or 0)} stays "
                        f"above the {format_size(budget_b)} budget after re-planning; "
                        f"the minimum that fits is about "
                        f"{format_size(plan.min_budget_bytes)}")
    finally:
        for p, g in zip(params, old_grads, strict=True):
            p.grad = g
    return plan
