"""Checkpointing benchmark: toma-edge's planner against torch's checkpoint_sequential.

    python bench/bench_checkpoint.py            # about 3 minutes on 2 CPU cores

A training step (Adam) of an MLP of 24 blocks (Linear 512 + ReLU) at batch 2048, where
activations dominate memory. Peak = rise of RSS during forward+backward above what is
held before it (parameters, Adam state and zeroed gradients allocated), measured with
toma_edge.probes (VmHWM); step time = median of timed steps (seconds).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # exact high-water marks
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from toma_edge import BudgetError, format_size, plan_checkpointing
from toma_edge.probes import measure_peak

BLOCKS, WIDTH, BATCH, REPEATS = 24, 512, 2048, 3


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
                            for _ in range(BLOCKS)])
    x, y = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # Adam state allocated

    def run(forward) -> tuple[int, float]:  # type: ignore[no-untyped-def]
        peaks, times = [], []
        for i in range(REPEATS + 1):
            opt.zero_grad(set_to_none=False)
            t0 = time.perf_counter()
            with measure_peak() as m:
                loss = nn.functional.mse_loss(forward(x), y)
                loss.backward()
                del loss
            opt.step()
            if i:  # the first is warm-up
                times.append(time.perf_counter() - t0)
                peaks.append(m.rise_bytes)
        return max(peaks), statistics.median(times)

    rows: list[tuple[str, int, float, int | None]] = []
    none_peak, none_t = run(model)
    rows.append(("no checkpointing", none_peak, none_t, None))
    seq: list[tuple[int, int, float]] = []
    for s in range(1, BLOCKS + 1):
        pk, t = run(lambda h, s=s: checkpoint_sequential(model, s, h, use_reentrant=False))
        seq.append((s, pk, t))
        rows.append((f"checkpoint_sequential({s})", pk, t, None))
    toma: list[tuple[str, int, int, float, int]] = []
    budgets = [("75%", int(none_peak * 0.75)), ("50%", int(none_peak * 0.5))]
    probe = plan_checkpointing(model, x, budget=budgets[-1][1])
    lo = probe.min_budget_bytes
    while True:  # the smallest budget the planner accepts (verified by measurement)
        try:
            plan_checkpointing(model, x, budget=lo)
            break
        except BudgetError:
            lo = int(lo * 1.02)
    budgets.append(("smallest", lo))
    for name, b in budgets:
        t0 = time.perf_counter()
        plan = plan_checkpointing(model, x, budget=b)
        plan_s = time.perf_counter() - t0
        planned = plan.apply(model)
        pk, t = run(planned)
        toma.append((name, b, pk, t, len(plan.segments)))
        rows.append((f"toma-edge {name} ({format_size(b)}) {list(plan.segments)}", pk, t, b))
        print(f"  planned {name} in {plan_s:.1f} s: {plan.describe()}", flush=True)

    print(f"\nMLP {BLOCKS}x(Linear {WIDTH} + ReLU), batch {BATCH}, Adam; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| setting | measured peak | budget | step time (s) | time / no ckpt |")
    print("|---|---|---|---|---|")
    for name, pk, t, b in rows:
        print(f"| {name} | {format_size(pk)} | {format_size(b) if b else '-'} | {t:.3f} | "
              f"{t / none_t:.2f}x |")
    print()
    lowest_seq = min(pk for _, pk, _ in seq)
    for name, b, pk, t, _ in toma:
        fits = [(s, tt) for s, p, tt in seq if p <= b]
        best = min(fits, key=lambda r: r[1]) if fits else None
        cmp = (f"fastest fitting checkpoint_sequential({best[0]}) {best[1]:.3f} s, "
               f"ratio {t / best[1]:.2f}" if best else "no checkpoint_sequential setting fits")
        print(f"toma-edge {name}: peak {format_size(pk)} <= budget {format_size(b)}: "
              f"{pk <= b}; {t:.3f} s = {t / none_t:.2f}x no ckpt; {cmp}")
    print(f"smallest toma-edge budget {format_size(toma[-1][1])} vs lowest "
          f"checkpoint_sequential peak {format_size(lowest_seq)} "
          f"(ratio {toma[-1][1] / lowest_seq:.2f})")


if __name__ == "__main__":
    main()
