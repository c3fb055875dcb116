"""Adaptive batch size: run work in batches that fit a memory budget, on CPU and CUDA.

    from toma_edge.adaptive import map_batches
    outs = map_batches(lambda xb: model(xb), X, budget_bytes=64 << 20, start_size=64)
    y = torch.cat(outs)                       # every row once, in order
    # later calls from this line with inputs of the same shape start at the size found
    opts = AdaptOptions(budget_bytes=64 << 20, start_size=256, on_event=print)
    map_range(lambda a, b: model(X[a:b]), len(X), opts)          # one options value...
    map_chunks(score, rows_stream(), opts, key="scoring")         # ...fields overridden by name

For work whose result does not depend on the batch size (inference, evaluation,
calibration, micro-batches under gradient accumulation). On an out-of-memory error
(:func:`is_oom_error`) or a measured peak above ``budget_bytes`` the batch shrinks; a
failed batch is run again smaller, a finished one never again. Sizes are predicted
from the measured peak rise at two batch sizes (memory is close to affine in the batch
size, :class:`AffineMemoryModel`) rather than halved blindly, and grow back after
``grow_after`` successes in a row. The size found is cached per call site and input
signature. Every change is reported as an :class:`AdaptEvent` to ``on_event``. The
options (budget, sizes, growth, cache) are one :class:`AdaptOptions` value shared by
:func:`map_range`, :func:`map_batches`, :func:`map_chunks` and :func:`adaptive_batch_size`;
each also takes any of its fields as a keyword (``start_size=256``) that overrides it.

``budget_bytes`` bounds the peak rise of one batch above the memory held when it starts
(RSS on CPU, allocated bytes on CUDA), measured by :mod:`toma_edge.probes`.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, ParamSpec, TypeVar

from .budget import format_size
from .errors import BudgetError
from .probes import peak_probe

__all__ = [
    "is_oom_error",
    "AdaptEvent",
    "AdaptCallback",
    "AffineMemoryModel",
    "BatchSizePolicy",
    "AdaptOptions",
    "map_batches",
    "map_range",
    "map_chunks",
    "adaptive_batch_size",
    "clear_size_cache",
    "cached_size",
]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

_OOM_TEXT = (
    "out of memory",
    "not enough memory",
    "can't allocate memory",
    "cannot allocate memory",
    "failed to allocate memory",
    "defaultcpuallocator",
)


def is_oom_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what it was raised from) means the allocator ran out.

    Recognises ``torch.OutOfMemoryError`` (CUDA), ``MemoryError`` and RuntimeErrors of
    the CPU allocator ("DefaultCPUAllocator: not enough memory", "can't allocate
    memory"). Never imports torch.
    """
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 4:
        if isinstance(e, MemoryError):
            return True
        torch = sys.modules.get("torch")
        oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
        if oom_type is not None and isinstance(e, oom_type):
            return True
        if isinstance(e, RuntimeError) and e.args and isinstance(e.args[0], str):
            text = e.args[0].lower()
            if any(t in text for t in _OOM_TEXT):
                return True
        e = e.__cause__
        seen += 1
    return False


EventKind = Literal["cached", "shrink", "grow"]
Reason = Literal["cache", "oom", "over_budget", "prediction", "streak"]


@dataclass(frozen=True)
class AdaptEvent:
    """One change of batch size. Sizes in items, memory in bytes.

    ``kind``: ``"cached"`` (started from a size found earlier), ``"shrink"``, ``"grow"``.
    ``reason``: ``"cache"``, ``"oom"`` (allocator failure), ``"over_budget"`` (measured
    rise above the budget), ``"prediction"`` (the affine model says a size fits),
    ``"streak"`` (grow after ``grow_after`` successes). ``rise_bytes`` is the measured
    rise that triggered it, when one was measured; ``done_items`` how many items were
    finished at that moment.
    """

    site: str
    kind: EventKind
    reason: Reason
    old_size: int
    new_size: int
    done_items: int = 0
    rise_bytes: int | None = None
    budget_bytes: int | None = None


AdaptCallback = Callable[[AdaptEvent], None]
"""Receives every :class:`AdaptEvent` (telemetry, progress display, logs)."""


@dataclass(frozen=True)
class AffineMemoryModel:
    """Peak rise of one batch as ``intercept_bytes + slope_bytes * size``."""

    intercept_bytes: float
    slope_bytes: float

    def bytes_for(self, size: int) -> float:
        """Predicted peak rise in bytes for a batch of ``size`` items."""
        return self.intercept_bytes + self.slope_bytes * size

    def size_for(self, budget_bytes: int, *, headroom: float = 0.95) -> int:
        """Largest size whose predicted rise is within ``headroom * budget_bytes`` (>= 0)."""
        room = headroom * budget_bytes - max(0.0, self.intercept_bytes)
        if self.slope_bytes <= 0:
            return sys.maxsize
        return max(0, int(room // self.slope_bytes))

    @classmethod
    def fit(cls, points: Sequence[tuple[int, int]]) -> AffineMemoryModel | None:
        """Least-squares fit to ``(size, rise_bytes)`` points; None below 2 distinct sizes."""
        sizes = {s for s, _ in points}
        if len(sizes) < 2:
            return None
        n = len(points)
        mx = sum(s for s, _ in points) / n
        my = sum(r for _, r in points) / n
        sxx = sum((s - mx) ** 2 for s, _ in points)
        sxy = sum((s - mx) * (r - my) for s, r in points)
        slope = sxy / sxx
        if slope <= 0:  # noise swamped the signal: stay conservative
            return None
        return cls(intercept_bytes=my - slope * mx, slope_bytes=slope)


@dataclass
class _CacheEntry:
    size: int
    budget_bytes: int | None
    points: list[tuple[int, int]] = field(default_factory=list)
    fail_at: int | None = None


_CACHE: dict[tuple[str, Any], _CacheEntry] = {}
_CACHE_LOCK = threading.Lock()


def clear_size_cache() -> None:
    """Forget every cached batch size."""
    with _CACHE_LOCK:
        _CACHE.clear()


def cached_size(key: str, signature: Any = None) -> int | None:
    """The size cached for ``key`` (a call site) and input ``signature``, if any."""
    with _CACHE_LOCK:
        e = _CACHE.get((key, signature))
        return e.size if e is not None else None


class BatchSizePolicy:
    """The state machine behind the helpers; usable alone (the device Predictor does).

    Ask ``size`` for the next batch, then report ``success(size, rise_bytes=...)`` or
    ``failure(size)``. Sizes stay within ``[min_size, max_size]`` and below the smallest
    size that failed. ``headroom`` is the fraction of the budget a prediction aims at.
    """

    def __init__(
        self,
        *,
        start_size: int,
        max_size: int | None = None,
        min_size: int = 1,
        budget_bytes: int | None = None,
        grow_after: int = 4,
        headroom: float = 0.95,
        site: str = "",
        signature: Any = None,
        on_event: AdaptCallback | None = None,
        use_cache: bool = True,
    ) -> None:
        if start_size < 1 or min_size < 1:
            raise ValueError("start_size and min_size must be >= 1")
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.max_size = max_size if max_size is not None else sys.maxsize
        self.min_size = min_size
        self.budget_bytes = budget_bytes
        self.grow_after = grow_after
        self.headroom = headroom
        self.site = site
        self.on_event = on_event
        self.done_items = 0
        self.trials = 0
        self._key = (site, signature) if use_cache and site else None
        self._points: list[tuple[int, int]] = []
        self._fail_at: int | None = None  # smallest size that failed (OOM or over budget)
        self._streak = 0
        self._ok_max = 0  # largest size that finished
        self.size = self._clip(start_size)
        self._ceiling = self.size
        if self._key is not None:
            with _CACHE_LOCK:
                hit = _CACHE.get(self._key)
            if hit is not None:
                self._points = list(hit.points)
                self._fail_at = hit.fail_at if hit.budget_bytes == budget_bytes else None
                old, size = self.size, hit.size
                model = AffineMemoryModel.fit(self._points)
                if hit.budget_bytes != budget_bytes and budget_bytes is not None and model:
                    size = model.size_for(budget_bytes, headroom=headroom)
                self.size = self._clip(size)
                self._ceiling = max(self._ceiling, self.size)
                self._emit("cached", "cache", old, self.size)

    # -- internals --------------------------------------------------------------------
    def _clip(self, size: int) -> int:
        hi = self.max_size
        if self._fail_at is not None:
            hi = min(hi, self._fail_at - 1)
        return max(self.min_size, min(size, hi))

    def _emit(self, kind: EventKind, reason: Reason, old: int, new: int,
              rise: int | None = None) -> None:
        if self.on_event is not None:
            self.on_event(AdaptEvent(self.site, kind, reason, old, new, self.done_items,
                                     rise, self.budget_bytes))

    def _set(self, new: int, reason: Reason, rise: int | None = None) -> None:
        new = self._clip(new)
        if new == self.size:
            return
        old, self.size = self.size, new
        self._streak = 0
        self._emit("grow" if new > old else "shrink", reason, old, new, rise)

    def _store(self) -> None:
        if self._key is None:
            return
        with _CACHE_LOCK:
            _CACHE[self._key] = _CacheEntry(self.size, self.budget_bytes,
                                            self._points[-16:], self._fail_at)

    def _predicted(self) -> int | None:
        """The size the measurements say fits the budget, or None without a budget."""
        if self.budget_bytes is None or not self._points:
            return None
        model = AffineMemoryModel.fit(self._points)
        if model is None:
            # one size seen: rise/size over-estimates the slope when the intercept >= 0,
            # so this guess stays at or below the largest size that fits
            # so this guess stays at or below the largest size that fits; a small first
            # batch reads mostly noise, so never jump more than 16x on one point
            s, r = max(self._points)
            per_item = max(r, 1) / s
            return min(int(self.headroom * self.budget_bytes / per_item), 16 * s)
        return model.size_for(self.budget_bytes, headroom=self.headroom)

    @property
    def model(self) -> AffineMemoryModel | None:
        """The affine fit of the rises measured so far (None below two sizes)."""
        return AffineMemoryModel.fit(self._points)

    @property
    def fail_size(self) -> int | None:
        """The smallest size that failed so far (items), or None."""
        return self._fail_at

    # -- public -----------------------------------------------------------------------
    @property
    def measuring(self) -> bool:
        """Whether batches should be measured (a budget was given)."""
        return self.budget_bytes is not None

    def success(self, size: int, *, items: int | None = None, rise_bytes: int | None = None,
                ) -> None:
        """Record a finished batch of ``size`` items (``items`` if the last was short)."""
        self.trials += 1
        n = size if items is None else items
        self.done_items += n
        self._ok_max = max(self._ok_max, n)
        if rise_bytes is not None:
            self._points.append((n, int(rise_bytes)))
            self._points = self._points[-16:]
        if (rise_bytes is not None and self.budget_bytes is not None
                and rise_bytes > self.budget_bytes):
            # finished, so kept; but that size is too big for the budget
            self._fail_at = n if self._fail_at is None else min(self._fail_at, n)
            pred = self._predicted()
            self._set(min(pred if pred is not None else n // 2, n - 1),
                      "over_budget", rise_bytes)
            self._store()
            return
        self._streak += 1
        pred = self._predicted()
        distinct = len({s for s, _ in self._points})
        if pred is not None and pred > self.size and (distinct < 3 or
                                                      self._streak >= self.grow_after):
            # still probing (under three sizes seen) or a steady streak: go to the
            # prediction at once
            self._set(pred, "prediction")
        elif pred is not None and pred < self.size:
            self._set(pred, "prediction")
        elif pred is None and self._streak >= self.grow_after and self.size < self._ceiling:
            # without a budget, grow back only toward the size asked for: past it the
            # next failure on CPU may be the kernel's OOM killer, not an exception
            target = min(self.size * 2, self._ceiling)
            if self._fail_at is not None:  # binary search toward the failing size
                target = min(target, self.size + max(1, (self._fail_at - self.size) // 2))
            self._set(target, "streak")
        self._store()

    def failure(self, size: int, *, rise_bytes: int | None = None) -> None:
        """Record an out-of-memory failure at ``size``; BudgetError at ``min_size``."""
        self.trials += 1
        if size <= self.min_size:
            raise BudgetError(
                f"{self.site or 'work'} ran out of memory even at batch size {size}"
                + (f" (budget {format_size(self.budget_bytes)})" if self.budget_bytes else "")
                + "; free memory or raise the budget"
            )
        self._fail_at = size if self._fail_at is None else min(self._fail_at, size)
        pred = self._predicted()
        new = size // 2 if pred is None else min(pred, size - 1)
        if self._ok_max < size:  # a size that worked before beats halving
            new = max(new, self._ok_max)
        self._set(new, "oom", rise_bytes)
        if self.size >= size:  # clipped at the top: still must shrink
            self.size = max(self.min_size, size - 1)
        self._store()


# -- the loops ------------------------------------------------------------------------


def _signature(data: Any) -> Any:
    shape = getattr(data, "shape", None)
    if shape is not None:
        return (tuple(int(d) for d in tuple(shape)[1:]), str(getattr(data, "dtype", "")))
    if isinstance(data, (list, tuple)):
        return type(data).__name__
    return None


def _site_of(fn: Callable[..., Any], key: str | None, depth: int = 2) -> str:
    if key is not None:
        return key
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
    finally:
        del frame
    name = getattr(fn, "__qualname__", type(fn).__name__)
    return f"{getattr(fn, '__module__', '')}.{name}@{where}"


def release_after_oom() -> None:
    # no gc.collect(): the failed frames are gone once the except block ends; only hand
    # cached CUDA blocks back so the smaller retry can use them
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _run_one(policy: BatchSizePolicy, call: Callable[[], R]) -> tuple[bool, R | None, int | None]:
    """Run ``call`` (measured if the policy has a budget): (ok, result, rise_bytes)."""
    failed = False
    result: R | None = None
    rise: int | None = None
    try:
        if policy.measuring:
            with peak_probe().measure() as m:
                result = call()
            rise = m.device_rise_bytes
        else:
            result = call()
    except Exception as e:
        if not is_oom_error(e):
            raise
        failed = True
    if failed:
        release_after_oom()
        return False, None, None
    return True, result, rise


@dataclass(frozen=True)
class AdaptOptions:
    """How the ``map_*`` helpers and :func:`adaptive_batch_size` size their batches.

    ``budget_bytes``: the peak rise one batch may cause (None: only out-of-memory errors
    shrink). ``start_size``, ``max_size``, ``min_size``: batch sizes in items (``max_size``
    None: no bound but the input's length). ``grow_after``: successes in a row before the
    size grows. ``headroom``: the fraction of the budget a predicted size aims at. ``key``:
    the call site for the size cache (default: the caller's file and line plus ``fn``'s
    name); ``signature``: the input's signature in that cache (map_batches: the data's
    shape past the first dimension and dtype). ``on_event``: every size change.
    ``use_cache``: start from, and store, the size found per site and signature.
    """

    budget_bytes: int | None = None
    start_size: int = 64
    max_size: int | None = None
    min_size: int = 1
    grow_after: int = 4
    headroom: float = 0.95
    key: str | None = None
    signature: Any = None
    on_event: AdaptCallback | None = None
    use_cache: bool = True

    def with_(self, **overrides: Any) -> AdaptOptions:
        """These options with some fields replaced; TypeError naming an unknown one."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown adaptive option(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(f.name for f in fields(self))}")
        return replace(self, **overrides) if overrides else self

    def policy(self, site: str, n: int | None = None) -> BatchSizePolicy:
        """A fresh :class:`BatchSizePolicy` for ``n`` items (None: a stream) at ``site``."""
        start, max_size = self.start_size, self.max_size
        if n is not None:
            max_size = n if max_size is None else min(max_size, n)
            start = min(start, max(1, n))
        return BatchSizePolicy(start_size=start, max_size=max_size, min_size=self.min_size,
                               budget_bytes=self.budget_bytes, grow_after=self.grow_after,
                               headroom=self.headroom, site=site, signature=self.signature,
                               on_event=self.on_event, use_cache=self.use_cache)


def _options(options: AdaptOptions | None, overrides: dict[str, Any]) -> AdaptOptions:
    return (options or AdaptOptions()).with_(**overrides)


def map_range(
    fn: Callable[[int, int], R],
    n: int,
    options: AdaptOptions | None = None,
    **overrides: Any,
) -> list[R]:
    """Call ``fn(start, stop)`` over ``range(n)`` in adaptive batches; results in order.

    Each index is in exactly one finished call. ``options`` (and ``overrides``, any of its
    fields by name): see :class:`AdaptOptions`.
    """
    opts = _options(options, overrides)
    policy = opts.policy(_site_of(fn, opts.key), n)
    out: list[R] = []
    i = 0
    while i < n:
        size = policy.size
        stop = min(n, i + size)
        ok, r, rise = _run_one(policy, lambda a=i, b=stop: fn(a, b))  # type: ignore[misc]
        if not ok:
            policy.failure(stop - i)
            continue
        out.append(r)  # type: ignore[arg-type]
        policy.success(size, items=stop - i, rise_bytes=rise)
        i = stop
    return out


def map_batches(
    fn: Callable[[Any], R],
    data: Any,
    options: AdaptOptions | None = None,
    **overrides: Any,
) -> list[R]:
    """Call ``fn(data[i:j])`` over a sliceable ``data`` (tensor, array, list) in order.

    The cache signature is the shape past the first dimension and the dtype (unless the
    options name one). ``options``/``overrides``: see :class:`AdaptOptions`.
    """
    opts = _options(options, overrides)
    opts = opts.with_(key=_site_of(fn, opts.key),
                      signature=_signature(data) if opts.signature is None else opts.signature)
    return map_range(lambda a, b: fn(data[a:b]), len(data), opts)


def map_chunks(
    fn: Callable[[list[T]], R],
    items: Iterable[T],
    options: AdaptOptions | None = None,
    **overrides: Any,
) -> Iterator[R]:
    """Call ``fn(list_of_items)`` over any iterable (a stream) in adaptive chunks.

    A generator: it pulls only what the next chunk needs. Items of a failed chunk stay
    at the front of the buffer and go into the next, smaller chunks.
    ``options``/``overrides``: see :class:`AdaptOptions` (checked at the call).
    """
    opts = _options(options, overrides)
    return _chunks(fn, items, opts.policy(_site_of(fn, opts.key)))


def _chunks(fn: Callable[[list[T]], R], items: Iterable[T],
            policy: BatchSizePolicy) -> Iterator[R]:
    it = iter(items)
    buf: list[T] = []
    exhausted = False
    while True:
        size = policy.size
        while not exhausted and len(buf) < size:
            try:
                buf.append(next(it))
            except StopIteration:
                exhausted = True
        if not buf:
            return
        chunk = buf[:size]
        ok, r, rise = _run_one(policy, lambda c=chunk: fn(c))  # type: ignore[misc]
        if not ok:
            policy.failure(len(chunk))
            continue
        del buf[:len(chunk)]
        policy.success(size, items=len(chunk), rise_bytes=rise)
        yield r  # type: ignore[misc]


def adaptive_batch_size(
    options: AdaptOptions | None = None,
    **overrides: Any,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorator: ``fn(batch_size, *args, **kwargs)`` is retried smaller on OOM.

        @adaptive_batch_size(start_size=256, budget_bytes=128 << 20)
        def evaluate(batch_size, X): ...
        evaluate(X)                       # the wrapper supplies batch_size

    Use it when ``fn`` runs all its batches itself and can simply start over. A call
    whose measured rise was above the budget keeps its result; the next call starts
    smaller. The cache key is ``fn``'s qualified name plus the signature of the first
    positional argument that has a shape. ``options``/``overrides``: see
    :class:`AdaptOptions` (``grow_after`` does not apply: a call never grows).
    """
    opts = _options(options, overrides).with_(grow_after=1 << 30)

    def deco(fn: Callable[..., R]) -> Callable[..., R]:
        site = opts.key or f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            sig = next((_signature(a) for a in args if hasattr(a, "shape")), None)
            policy = opts.with_(signature=sig).policy(site)
            while True:
                size = policy.size
                ok, r, rise = _run_one(policy, lambda s=size: fn(s, *args, **kwargs))  # type: ignore[misc]
                if ok:
                    policy.success(size, rise_bytes=rise)
                    return r  # type: ignore[return-value]
                policy.failure(size)

        return wrapper

    return deco
