"""The adaptive helpers share one options value (AdaptOptions); keywords override it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from toma_edge.adaptive import (
    AdaptEvent,
    AdaptOptions,
    adaptive_batch_size,
    clear_size_cache,
    map_batches,
    map_chunks,
    map_range,
)


def _oom_above(limit: int) -> Callable[[int, int], tuple[int, int]]:
    def fn(a: int, b: int) -> tuple[int, int]:
        if b - a > limit:
            raise MemoryError("out of memory")  # what is_oom_error recognises
        return a, b

    return fn


def test_one_options_value_drives_every_helper() -> None:
    clear_size_cache()
    events: list[AdaptEvent] = []
    opts = AdaptOptions(start_size=50, min_size=2, use_cache=False, on_event=events.append)
    spans = map_range(_oom_above(20), 100, opts)
    assert spans[0][0] == 0 and spans[-1][1] == 100
    assert all(b - a <= 20 for a, b in spans)
    assert any(e.kind == "shrink" for e in events)
    # the same options, one field overridden by name: the rest still applies
    seen: list[int] = []

    def count(xb: np.ndarray) -> int:
        seen.append(len(xb))
        return len(xb)

    out = map_batches(count, np.zeros((30, 3)), opts, start_size=7)
    assert sum(out) == 30 and seen[0] == 7
    chunks = list(map_chunks(len, iter(range(10)), opts, start_size=4))
    assert sum(chunks) == 10 and chunks[0] == 4
    assert opts.start_size == 50  # options are a value: overriding does not change them


def test_keywords_alone_still_work_and_unknown_ones_fail_at_the_call() -> None:
    clear_size_cache()
    assert map_range(lambda a, b: b - a, 10, start_size=3, use_cache=False) == [3, 3, 3, 1]
    with pytest.raises(TypeError, match="start_sise"):
        map_chunks(len, iter(range(3)), start_sise=2)  # misspelt: refused before any work
    with pytest.raises(TypeError, match="budget"):
        AdaptOptions().with_(budget=1)


def test_decorator_takes_the_same_options() -> None:
    clear_size_cache()
    sizes: list[int] = []

    @adaptive_batch_size(AdaptOptions(start_size=64, use_cache=False))
    def work(batch_size: int, n: int) -> int:
        sizes.append(batch_size)
        if batch_size > 16:
            raise MemoryError("out of memory")
        return n // batch_size

    assert work(64) == 64 // sizes[-1] and sizes[0] == 64 and sizes[-1] <= 16
