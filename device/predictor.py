"""Memory-budgeted inference over any number of rows.

    from toma_edge.device.predictor import Predictor
    p = Predictor("dist/rpi4", budget="512MiB", threads=1)   # BudgetError: baseline alone over
    pred = p.predict(np.random.rand(100_000, 10))             # any number of rows, any real dtype
    pred.outputs.shape, pred.classes                          # (100000, 1), None (regression)
    p.batch_size, p.working_budget_bytes, p.baseline_bytes    # rows, bytes, bytes

What a budget means (docs/architecture.md): ``budget_bytes`` caps the peak RSS of the whole process.
At start the Predictor measures the process baseline (interpreter, libraries, the loaded
program) and works within what is left, the *working budget*; a baseline already over the
budget is a :class:`~toma_edge.errors.BudgetError` at once. Batches hold at most the
exported ``max_batch`` rows (ExecuTorch refuses more) and are sized from the manifest's
``measured_peak_bytes`` (measured at build time with XNNPACK's workspace, which the
program's memory plan leaves out). While running, the first batch at each size and then
one batch every ``measure_interval_s`` are measured with the process-wide peak probe; a
peak over the budget (or an out-of-memory error) makes :class:`toma_edge.adaptive.BatchSizePolicy`
shrink the batch. The results never depend on the batch size (unless the manifest says
``batch_dependent``, int8-dynamic, where rows of one call share activation scales).

A program exported for a fixed batch (the manifest's ``export_batch``: recurrent graphs)
runs every call at exactly that many rows: a shorter batch is padded with copies of its
last row and the padding's outputs dropped, a longer one split; its cost is that batch's
measured peak whatever the number of rows.

Thread safety: one Predictor may be shared by threads. Calls run their batches one at a
time through the program (an ExecuTorch method is not reentrant); the policy's state is
guarded by a lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..adaptive import AdaptCallback, AdaptEvent, BatchSizePolicy, is_oom_error
from ..budget import MemoryBudget, format_size
from ..bundle import Manifest
from ..errors import BudgetError, InputError
from ..probes import peak_probe, rss_bytes
from .adapter import Program, pad_batch
from .bundle import LoadedBundle, load_bundle

__all__ = ["Prediction", "Predictor"]


@dataclass(frozen=True)
class Prediction:
    """What :meth:`Predictor.predict` answers.

    ``outputs``: float32 ``(rows, *output_shape)``. For classification (probabilities,
    the graph ends in softmax) ``class_index`` is the argmax per row (int64) and
    ``classes`` the matching labels from the manifest; both are None for regression.
    """

    outputs: np.ndarray
    class_index: np.ndarray | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return int(self.outputs.shape[0])


class Predictor:
    """Run a bundle's model over rows within a memory budget. See the module docstring.

    ``bundle``: a folder, a ``.tar.gz`` archive or a :class:`LoadedBundle` (then
    ``threads``, ``trust_key`` and ``adapter`` are those it was loaded with).
    ``budget``: the inference budget of the whole process (bytes or ``"512MiB"``); default
    the manifest target's. ``on_event`` receives every batch-size change.
    ``measure_interval_s``: seconds between measured batches once the size is settled.
    """

    def __init__(
        self,
        bundle: str | Path | LoadedBundle,
        *,
        budget: int | str | None = None,
        threads: int | None = None,
        trust_key: str | Path | None = None,
        adapter: str = "auto",
        on_event: AdaptCallback | None = None,
        measure_interval_s: float = 1.0,
    ) -> None:
        if isinstance(bundle, LoadedBundle):
            self.bundle = bundle
        else:
            self.bundle = load_bundle(bundle, trust_key=trust_key, threads=threads, adapter=adapter)
        self.manifest: Manifest = self.bundle.manifest
        #: XNNPACK threads the program was loaded with
        self.threads = self.bundle.threads
        self.program: Program = self.bundle.program
        m = self.manifest
        if len(m.inputs) != 1 or len(m.outputs) != 1:
            raise InputError(f"{m.name}: the Predictor runs one-input, one-output models; "
                             f"this one has {len(m.inputs)} inputs and {len(m.outputs)} outputs")
        self.input_spec = m.inputs[0]
        self.output_spec = m.outputs[0]
        #: the one batch a fixed-batch program runs at (None: any batch up to max_batch)
        self.fixed_batch: int | None = m.export_batch

        if budget is None:
            self.budget = MemoryBudget(m.target.memory_budget_bytes,
                                       f"target {m.target.name}'s inference budget")
        else:
            self.budget = MemoryBudget.parse(budget, source="--budget")
        #: RSS of the whole process once the program is loaded, in bytes
        self.baseline_bytes = rss_bytes()
        peak_probe().note(self.baseline_bytes)
        self.working_budget_bytes = self.budget.working(baseline_bytes=self.baseline_bytes).bytes
        start = self.fitting_batch(self.working_budget_bytes)
        if start < 1:
            need = m.memory.peak_for_batch(1)
            raise BudgetError(
                f"{m.name} needs {format_size(need)} at batch 1 but the "
                f"{format_size(self.budget.bytes)} budget ({self.budget.source}) leaves "
                f"{format_size(self.working_budget_bytes)} after "
                f"the {format_size(self.baseline_bytes)} baseline; raise the budget to at least "
                f"{format_size(self.baseline_bytes + need + (1 << 20))}"
            )
        self.events: list[AdaptEvent] = []
        self._user_on_event = on_event
        self._policy = BatchSizePolicy(
            start_size=start, max_size=start, budget_bytes=self.working_budget_bytes,
            headroom=0.9, site=f"predictor:{m.name}", on_event=self._on_event, use_cache=False,
        )
        self._lock = threading.Lock()
        self._measured_sizes: set[int] = set()
        self._last_measure = 0.0
        self.measure_interval_s = float(measure_interval_s)
        self.rows_done = 0
        self.batches_done = 0

    # -- sizes --------------------------------------------------------------------------
    def fitting_batch(self, bytes_available: int) -> int:
        """Largest batch (rows, <= max_batch) whose measured peak fits ``bytes_available``
        bytes; 0 when not even one row fits. Use it to size a service's micro-batch."""
        mem = self.manifest.memory
        if self.fixed_batch:
            fits = mem.peak_for_batch(self.fixed_batch) <= bytes_available
            return self.fixed_batch if fits else 0
        lo, hi = 0, self.manifest.max_batch
        while lo < hi:  # measured peaks grow with the batch: bisect
            mid = (lo + hi + 1) // 2
            if mem.peak_for_batch(mid) <= bytes_available:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def batch_cost_bytes(self, rows: int) -> int:
        """Measured peak RSS rise (bytes) of one batch of ``rows`` rows (manifest figures)."""
        if self.fixed_batch:
            rows = self.fixed_batch
        return self.manifest.memory.peak_for_batch(max(1, min(rows, self.manifest.max_batch)))

    @property
    def batch_size(self) -> int:
        """Rows per batch now (the policy's current size)."""
        return self._policy.size

    @property
    def free_bytes(self) -> int:
        """Working budget left once a batch of :attr:`batch_size` is paid: what loaders may
        spend on buffers and prefetch (bytes, >= 0)."""
        return max(0, self.working_budget_bytes - self.batch_cost_bytes(self.batch_size))

    @property
    def row_bytes(self) -> int:
        """Bytes of one float32 input row."""
        return 4 * self.input_spec.width

    @property
    def n_outputs(self) -> int:
        """Output values per row."""
        return self.output_spec.width

    def _on_event(self, e: AdaptEvent) -> None:
        if e.reason in ("over_budget", "oom"):
            # never grow back past a size the budget refused: glibc reuses freed memory,
            # so later (smaller) batches can read lower than they cost and invite a
            # prediction that only fails again
            self._policy.max_size = min(self._policy.max_size, e.new_size)
        self.events.append(e)
        if self._user_on_event is not None:
            self._user_on_event(e)

    # -- input --------------------------------------------------------------------------
    def validate(self, rows: Any, *, first_row: int = 0,
                 finite_checked: bool = False) -> np.ndarray:
        """Rows as a C-contiguous float32 array ``(n, *row_shape)``; InputError if the
        width, dtype or a value is wrong (``first_row`` numbers rows in messages).
        ``finite_checked``: the caller (a streaming reader) already refused non-finite
        float32 values, so that pass over the rows is not made twice."""
        spec = self.input_spec
        want = spec.row_shape
        if isinstance(rows, np.ndarray):
            x = rows
        else:
            try:  # a value beyond float32 becomes inf here and is refused below, quietly
                with np.errstate(over="ignore", invalid="ignore"):
                    x = np.asarray(rows, dtype=np.float32)
            except (ValueError, TypeError, OverflowError) as e:
                raise InputError(
                    f"rows must be a list of {spec.width} numbers each (same length); {e}"
                ) from e
        if x.dtype.kind not in "fiu":
            raise InputError(f"rows must be real numbers, got dtype {x.dtype}; "
                             "convert them to float32")
        if x.ndim == 1 and len(want) == 1 and x.shape[0] == want[0] and x.shape[0] != 0:
            raise InputError(
                f"got one flat row of {x.shape[0]} values; pass rows as a 2-D array "
                f"(rows, {want[0]}), e.g. [row] for one row"
            )
        if x.ndim == 1 and x.shape[0] == 0:
            x = x.reshape(0, *want)
        if x.shape[1:] != want:
            got = list(x.shape[1:]) if x.ndim > 1 else "a flat list"
            raise InputError(
                f"each row must have shape {list(want)} ({spec.width} values) for input "
                f"'{spec.name}' {list(spec.shape)}, got rows of {got}"
            )
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            finite_checked = False  # a cast can overflow to inf
            with np.errstate(over="ignore"):
                x = np.ascontiguousarray(x, dtype=np.float32)
        # NaN propagates through min and max, and inf is its own extreme: two SIMD
        # reductions without a temporary decide "all finite", the common case
        if x.size and not finite_checked and not (np.isfinite(x.min()) and np.isfinite(x.max())):
            finite = np.isfinite(x)
            if not finite.all():
                flat = finite.reshape(len(x), -1)
                r = int(np.argmin(flat.all(axis=1)))
                c = int(np.argmin(flat[r]))
                raise InputError(
                    f"row {first_row + r} has a non-finite value ({x.reshape(len(x), -1)[r, c]}) "
                    f"in column {c} (NaN, inf or beyond float32's range); clean or drop that row"
                )
        return x

    # -- inference ----------------------------------------------------------------------
    def predict(self, rows: Any, *, first_row: int = 0, finite_checked: bool = False,
                out: np.ndarray | None = None) -> Prediction:
        """Outputs for every row, in order; batches of at most ``max_batch`` that fit the
        working budget. Raises InputError for bad rows (nothing is run then) and
        BudgetError if even one row per batch does not fit.

        ``finite_checked``: see :meth:`validate`. ``out``: a float32 C-contiguous array
        ``(n, *output_row_shape)`` to write the outputs into (a writer's buffer), so no
        array is allocated per call."""
        x = self.validate(rows, first_row=first_row, finite_checked=finite_checked)
        n = len(x)
        shape = (n, *self.output_spec.row_shape)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise InputError(f"out must be a C-contiguous float32 array of shape {shape}, "
                             f"got {out.dtype} {out.shape}")
        i = batches = 0
        run = self._run_fixed_into if self.fixed_batch else self.program.run_batches_into
        probe = peak_probe()
        while i < n:
            size = self._policy.size
            j = min(n, i + size)
            now = time.perf_counter()
            if size in self._measured_sizes and now - self._last_measure < self.measure_interval_s:
                j = min(n, i + 64 * size)  # up to 64 batches per call, then look at the clock
                run(x[i:j], out[i:j], size)
                batches += -(-(j - i) // size)
                i = j
                continue
            # a measured batch: the peak of the whole process against the budget
            try:
                with probe.measure() as meas:
                    run(x[i:j], out[i:j], size)
            except Exception as e:
                if not is_oom_error(e):
                    raise
                with self._lock:
                    self._policy.failure(j - i)  # BudgetError at one row
                continue
            with self._lock:
                self._measured_sizes.add(size)
                self._last_measure = time.perf_counter()
                # room for this batch: the budget less what the process held when it began
                self._policy.budget_bytes = max(1, self.budget.bytes - meas.start_bytes)
                self._policy.success(size, items=j - i, rise_bytes=meas.rise_bytes)
            i = j
            batches += 1
        with self._lock:
            self.rows_done += n
            self.batches_done += batches
        return self._answer(out)

    def _run_fixed_into(self, x: np.ndarray, out: np.ndarray, size: int) -> None:
        """run_batches_into for a fixed-batch program: whole batches of its size, then the
        rest padded with copies of its last row (``size`` is the policy's; ignored)."""
        b = self.fixed_batch
        assert b is not None
        whole = len(x) // b * b
        if whole:
            self.program.run_batches_into(x[:whole], out[:whole], b)
        rest = len(x) - whole
        if rest:
            (y,) = self.program.run([pad_batch(x[whole:], b)])
            out[whole:] = y[:rest]

    def _answer(self, out: np.ndarray) -> Prediction:
        if self.manifest.task != "classification" or out.ndim != 2:
            return Prediction(out)
        idx = np.argmax(out, axis=1) if len(out) else np.empty(0, dtype=np.int64)
        labels = self.manifest.classes
        names = [labels[k] for k in idx.tolist()] if labels else [str(k) for k in idx.tolist()]
        return Prediction(out, idx.astype(np.int64), names)

    def peak_rss_bytes(self) -> int:
        """The process's peak RSS so far (bytes), from the process-wide probe."""
        return peak_probe().running_peak_bytes()
