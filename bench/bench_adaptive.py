"""Adaptive batch benchmark on CPU: trials to reach the largest batch within a budget.

    python bench/bench_adaptive.py              # about 1 minute on 2 CPU cores

The work: inference of an MLP (1024 -> 4096 -> 4096 -> 256, GELU) on a batch; its
memory rise is close to affine in the batch size. The budget bounds the peak RSS rise
of one batch (bytes, measured with toma_edge.probes). "Largest that fits" is found by
bisection over measured sizes. toma-edge's policy starts small and predicts from two
measured sizes; BlackHC toma halves and accelerate's find_executable_batch_size backs
off by x0.9 from a large start, each treating a peak over the budget as a failure (on
a real device: the OOM killer). A trial = one run of the work at one size.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # exact high-water marks
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from torch import nn

from toma_edge import format_size
from toma_edge.adaptive import BatchSizePolicy
from toma_edge.probes import measure_peak

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096), nn.GELU(),
                      nn.Linear(4096, 256)).eval()
X = torch.randn(16384, 1024)


def rise(n: int) -> int:
    with torch.no_grad(), measure_peak() as m:
        out = MODEL(X[:n])
        del out
    return m.rise_bytes


def largest_fit(budget: int) -> int:
    lo, hi = 1, len(X)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rise(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def toma_edge_policy(budget: int, start: int) -> tuple[int, int, int, list[int]]:
    pol = BatchSizePolicy(start_size=start, max_size=len(X), budget_bytes=budget)
    best_ok, trials, worst, sizes = 0, 0, 0, []
    for _ in range(6):
        s = pol.size
        r = rise(s)
        trials += 1
        sizes.append(s)
        worst = max(worst, r)
        pol.success(s, rise_bytes=r)
        if r <= budget:
            best_ok = max(best_ok, s)
    return best_ok, trials, worst, sizes


def backoff(budget: int, start: int, factor: float) -> tuple[int, int, int]:
    s, trials, worst = start, 0, 0
    while True:
        r = rise(s)
        trials += 1
        worst = max(worst, r)
        if r <= budget:
            return s, trials, worst
        s = max(1, int(s * factor))


def main() -> None:
    rise(64)
    print(f"MLP inference 1024-4096-4096-256, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| budget | largest fit | method | trials to within 10% | final size | "
          "worst peak / budget |")
    print("|---|---|---|---|---|---|")
    for budget_mib in (64, 160, 400):
        budget = budget_mib << 20
        best = largest_fit(budget)
        size, _, worst, sizes = toma_edge_policy(budget, start=32)
        within = next((i + 1 for i, s in enumerate(sizes)
                       if 0.9 * best <= s and rise(s) <= budget), None)
        print(f"| {format_size(budget)} | {best} | toma-edge (start 32) | {within} | "
              f"{size} | {worst / budget:.2f} |")
        for name, factor in (("toma halving (start 8192)", 0.5),
                             ("accelerate x0.9 (start 8192)", 0.9)):
            s, trials, worst = backoff(budget, 8192, factor)
            ok = "" if s >= 0.9 * best else " (not within 10%)"
            print(f"| {format_size(budget)} | {best} | {name} | {trials}{ok} | {s} | "
                  f"{worst / budget:.2f} |")
    print("\nsizes tried by toma-edge at the last budget:", sizes)


if __name__ == "__main__":
    main()
