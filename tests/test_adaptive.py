"""Adaptive batch size: OOM detection, no lost or repeated items, cache, prediction."""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator

import pytest
import torch

from toma_edge.adaptive import (
    AdaptEvent,
    AffineMemoryModel,
    BatchSizePolicy,
    adaptive_batch_size,
    cached_size,
    clear_size_cache,
    is_oom_error,
    map_batches,
    map_chunks,
    map_range,
)
from toma_edge.errors import BudgetError

MiB = 1 << 20

OOMS: list[Callable[[int], BaseException]] = [
    lambda n: torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} MiB"),
    lambda n: RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not "
                           f"enough memory: you tried to allocate {n} bytes."),
    lambda n: MemoryError(),
]


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_size_cache()
    yield
    clear_size_cache()


def test_is_oom_error() -> None:
    for make in OOMS:
        assert is_oom_error(make(1))
    assert is_oom_error(RuntimeError("[Errno 12] Cannot allocate memory"))
    wrapped = ValueError("loader failed")
    wrapped.__cause__ = MemoryError()
    assert is_oom_error(wrapped)
    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom_error(ValueError("out of range"))
    assert not is_oom_error(BudgetError("too small"))


class FakeAllocator:
    """Fails like a real allocator when a batch is larger than ``limit`` items."""

    def __init__(self, limit: int, make: Callable[[int], BaseException]) -> None:
        self.limit = limit
        self.make = make
        self.calls: list[int] = []
        self.failures = 0

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(xb))
        if len(xb) > self.limit:
            self.failures += 1
            raise self.make(len(xb))
        return xb * 2


@pytest.mark.parametrize("make", OOMS, ids=["torch-oom", "cpu-allocator", "memoryerror"])
def test_shrinks_without_losing_or_repeating(make: Callable[[int], BaseException]) -> None:
    X = torch.arange(1000)
    fake = FakeAllocator(37, make)
    events: list[AdaptEvent] = []
    outs = map_batches(fake, X, start_size=256, key="site-a", on_event=events.append)
    y = torch.cat(outs)
    assert torch.equal(y, X * 2)  # every item once, in order
    assert sum(len(o) for o in outs) == 1000
    assert 3 <= fake.failures <= 8  # 256 -> 128 -> 64 -> 32, then a few careful probes
    assert max(fake.calls[-5:]) >= 30  # grew back close to the 37 that fit
    shrinks = [e for e in events if e.kind == "shrink"]
    assert shrinks and all(e.reason == "oom" for e in shrinks)
    assert shrinks[0].old_size == 256 and shrinks[0].done_items == 0
    assert cached_size("site-a", ((), "torch.int64")) == max(
        c for c in fake.calls[-6:] if c <= 37)

    # same site and signature: starts at the cached size, no failure at all
    fake2 = FakeAllocator(37, make)
    events2: list[AdaptEvent] = []
    outs2 = map_batches(fake2, X, start_size=256, key="site-a", on_event=events2.append)
    assert torch.equal(torch.cat(outs2), X * 2)
    assert fake2.failures == 0
    assert events2[0].kind == "cached" and events2[0].new_size <= 37
    # another input signature is another cache entry
    fake3 = FakeAllocator(37, make)
    map_batches(fake3, X.float(), start_size=256, key="site-a")
    assert fake3.failures >= 1


def test_midway_failure_keeps_finished_batches() -> None:
    """Memory gets tight after 300 items: finished batches are not run again."""
    X = torch.arange(1000)
    seen: list[int] = []

    def work(a: int, b: int) -> list[int]:
        if a >= 300 and b - a > 20:
            raise MemoryError()
        seen.extend(range(a, b))
        return list(range(a, b))

    outs = map_range(work, 1000, start_size=100, key="midway")
    assert [i for o in outs for i in o] == list(range(1000))
    assert seen == list(range(1000))  # nothing repeated, in order
    assert torch.equal(X, torch.tensor(seen))


def test_non_oom_errors_propagate() -> None:
    def broken(xb: torch.Tensor) -> torch.Tensor:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        map_batches(broken, torch.zeros(10), key="broken")


def test_budget_error_at_batch_one() -> None:
    def never(xb: torch.Tensor) -> torch.Tensor:
        raise MemoryError()

    with pytest.raises(BudgetError, match="batch size 1"):
        map_batches(never, torch.zeros(10), start_size=8, key="never")


def test_chunks_pull_lazily_and_keep_every_item() -> None:
    pulled: list[int] = []

    def stream() -> Iterator[int]:
        for i in range(500):
            pulled.append(i)
            yield i

    def work(chunk: list[int]) -> list[int]:
        if len(chunk) > 30:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return chunk

    gen = map_chunks(work, stream(), start_size=64, key="chunks")
    first = next(gen)
    assert len(pulled) == 64  # only the first chunk was read
    rest = [x for c in gen for x in c]
    assert first + rest == list(range(500))


def test_decorator_keeps_arguments_and_caches() -> None:
    calls: list[tuple[int, int, str]] = []

    @adaptive_batch_size(start_size=128)
    def evaluate(batch_size: int, X: torch.Tensor, *, tag: str) -> int:
        calls.append((batch_size, len(X), tag))
        if batch_size > 50:
            raise MemoryError()
        return batch_size

    X = torch.zeros(10, 3)
    assert evaluate(X, tag="t") <= 50
    assert calls[0] == (128, 10, "t")
    assert all(c[1:] == (10, "t") for c in calls)
    n_first = len(calls)
    assert evaluate(X, tag="u") <= 50
    assert len(calls) == n_first + 1  # cached: one call, no failure
    assert evaluate.__name__ == "evaluate"


def test_prediction_reaches_the_largest_fit_in_few_trials() -> None:
    """Affine memory (10 MiB + 1 MiB per item), budget 100 MiB: 90 items fit."""
    budget = 100 * MiB
    pol = BatchSizePolicy(start_size=8, budget_bytes=budget, max_size=10_000)
    sizes = []
    for _ in range(4):
        s = pol.size
        sizes.append(s)
        pol.success(s, rise_bytes=10 * MiB + s * MiB)
    assert all(10 * MiB + s * MiB <= budget * 1.05 for s in sizes)
    assert pol.size >= 81 and pol.size <= 90
    assert sizes[2] >= 81  # the third trial is already within 10%
    m = pol.model
    assert m is not None and m.slope_bytes == pytest.approx(MiB, rel=1e-6)


def test_over_budget_shrinks_and_affine_model() -> None:
    pol = BatchSizePolicy(start_size=64, budget_bytes=40 * MiB)
    events: list[AdaptEvent] = []
    pol.on_event = events.append
    pol.success(64, rise_bytes=64 * MiB)  # finished but over budget
    assert pol.size < 40 and events[-1].reason == "over_budget"
    assert pol.fail_size == 64
    m = AffineMemoryModel.fit([(10, 20 * MiB), (20, 30 * MiB)])
    assert m is not None
    assert m.size_for(100 * MiB, headroom=1.0) == 90
    assert AffineMemoryModel.fit([(10, 5)]) is None


def _touch_map(nbytes: int) -> int:
    with mmap.mmap(-1, nbytes) as mm:  # bypasses malloc: RSS rises exactly by this much
        for off in range(0, nbytes, 4096):
            mm[off] = 1
        return nbytes


def test_real_peaks_stay_within_budget() -> None:
    """Work that really uses 1 MiB per item plus 2 MiB: measured through the probe."""
    budget = 40 * MiB
    events: list[AdaptEvent] = []
    sizes: list[int] = []

    def work(a: int, b: int) -> int:
        sizes.append(b - a)
        return _touch_map(2 * MiB + (b - a) * MiB)

    out = map_range(work, 400, budget_bytes=budget, start_size=4, key="real",
                    on_event=events.append)
    assert len(out) == len(sizes)
    assert sum(sizes) == 400
    assert max(sizes) * MiB + 2 * MiB <= budget * 1.05
    assert max(sizes) >= 30  # found most of the 38 that fit
    assert any(e.reason == "prediction" for e in events)
