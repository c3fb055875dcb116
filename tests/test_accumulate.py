"""Micro-batch accumulation: the same step as one full pass, through OOM and restarts."""

from __future__ import annotations

import copy

import torch
from torch import nn

from toma_edge.accumulate import accumulate_step
from toma_edge.adaptive import AdaptEvent, clear_size_cache
from toma_edge.checkpoint_plan import plan_checkpointing


class FailsAbove(nn.Module):
    """Identity that fails like the allocator for large batches, in forward or backward."""

    def __init__(self, limit: int, *, in_backward: bool) -> None:
        super().__init__()
        self.limit, self.in_backward = limit, in_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.limit:
            if not self.in_backward:
                raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to "
                                   "allocate 1073741824 bytes.")
            if x.requires_grad:
                x = x * 1.0
                x.register_hook(self._boom)
        return x

    @staticmethod
    def _boom(g: torch.Tensor) -> torch.Tensor:
        raise MemoryError()


def make(limit: int, *, in_backward: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(16, 64), nn.ReLU()),
        nn.Sequential(nn.Linear(64, 64), nn.Tanh()),
        FailsAbove(limit, in_backward=in_backward),
        nn.Sequential(nn.Linear(64, 32), nn.ReLU()),
        nn.Linear(32, 1),
    )


def full_step(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, adam: bool = True
              ) -> None:
    opt: torch.optim.Optimizer = (torch.optim.Adam(model.parameters(), lr=1e-2) if adam else
                                  torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        opt.step()


def test_same_weights_as_one_pass_with_oom_in_forward_and_backward() -> None:
    torch.manual_seed(1)
    X, y = torch.randn(256, 16), torch.randn(256, 1)
    for in_backward in (False, True):
        clear_size_cache()
        ref = make(10_000, in_backward=in_backward)
        full_step(ref, X, y)
        model = make(40, in_backward=in_backward)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        events: list[AdaptEvent] = []
        results = [accumulate_step(model, nn.functional.mse_loss, opt, X, y,
                                   key=f"acc-{in_backward}", on_event=events.append)
                   for _ in range(3)]
        assert results[0].micro_batch <= 40 and results[0].micro_batches >= 7
        assert (results[0].restarts > 0) == in_backward
        assert results[1].restarts == 0  # the cached size is reused
        assert events[0].kind == "shrink" and events[0].reason == "oom"
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_with_a_checkpoint_plan_and_a_budget() -> None:
    torch.manual_seed(2)
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(128, 128), nn.ReLU()) for _ in range(6)],
                           nn.Linear(128, 1))
    ref = copy.deepcopy(blocks)
    X, y = torch.randn(512, 128), torch.randn(512, 1)
    # SGD: Adam turns float rounding of near-zero gradients into lr-sized steps
    full_step(ref, X, y, adam=False)
    free = plan_checkpointing(blocks, X[:128], budget="1GiB", verify=False)
    plan = plan_checkpointing(blocks, X[:128], verify=False,
                              budget=(free.min_budget_bytes + free.no_checkpoint_peak_bytes) // 2)
    assert plan.segments
    opt = torch.optim.SGD(blocks.parameters(), lr=0.05, momentum=0.9)
    clear_size_cache()
    rs = [accumulate_step(blocks, nn.functional.mse_loss, opt, X, y, micro_batch=128,
                          plan=plan, budget_bytes=256 << 20, key="acc-plan")
          for _ in range(3)]
    assert rs[0].micro_batches >= 2  # started at 128 rows, grew as measured rises allowed
    assert all(r.peak_rise_bytes is not None for r in rs)
    for p, q in zip(blocks.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
