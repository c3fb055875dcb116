"""Does an exported program compute what its eager model does? Judged by what the task
cares about, at several batch sizes, in the ExecuTorch runtime.

    from toma_edge.host.verify import Tolerance, compare_program
    got = compare_program(program, res.reference, X_val, task="classification",
                          max_batch=64, quantization="int8", y=y_val)
    got.ok, got.reason, got.top1_agreement, got.batches

A program is compared with the eager model it was exported from (for int8 kinds, the
simulated-int8 model: this catches the runtime computing something else), and a quantized
one also with the fp32 model it was quantized from, with looser bounds (80% top-1
agreement, 25% error: this catches a quantization that is broken, e.g. calibrated on rows
that do not represent the data, where program and simulation agree on garbage).

A classifier's program must give the eager model's top-1 class on at least
``min_agreement`` of the rows (default 97%: a deep int8 network whose probabilities differ
by 0.1 still picks the same class almost always, and that is what the user ships); with
labels, the accuracy change is reported beside it. A regressor's must stay within
``max_error`` of the eager outputs, as the RMS difference over the outputs' standard
deviation (default 5% for int8, 0.1% for fp32). Non-finite outputs always fail. fp32
programs are held to 99% top-1 agreement (ties between near-equal classes may flip).

Each row runs once: a few at batch 1, a few runs of an odd middle size, the rest at
``max_batch`` (a program exported with a fixed batch runs padded to it), so a program that
only fails at some batch sizes is caught here, not on the device, and a big model is not
run three times over; each eager reference runs once too. A runtime error is caught and
becomes the reason, with the runtime's own first error line (the failing executor and its
message) and the batch size that fails.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..device.adapter import native_log, pad_batch
from ..errors import TomaEdgeError

__all__ = ["Tolerance", "Agreement", "compare_program", "verify_export", "run_padded",
           "verify_batches", "runtime_log"]


@dataclass(frozen=True)
class Tolerance:
    """How close a program must stay to its eager model (``compress.verify`` in a project)."""

    #: classifiers: the fraction of rows whose top-1 class must agree (quantized programs)
    min_agreement: float = 0.97
    #: regressors: RMS difference over the eager outputs' standard deviation (quantized)
    max_error: float = 0.05
    #: a quantized program against the fp32 model it came from: below this top-1 agreement
    #: (above this error) the quantization is broken, not merely lossy
    min_fp32_agreement: float = 0.8
    max_fp32_error: float = 0.25

    def for_kind(self, quantization: str) -> Tolerance:
        """fp32 programs compute the same float graph: held to 99% / 0.1%."""
        if quantization == "fp32":
            return Tolerance(max(self.min_agreement, 0.99), min(self.max_error, 1e-3),
                             self.min_fp32_agreement, self.max_fp32_error)
        return self

    def against_fp32(self) -> Tolerance:
        """The bounds of a quantized program against the fp32 model."""
        return Tolerance(self.min_fp32_agreement, self.max_fp32_error,
                         self.min_fp32_agreement, self.max_fp32_error)


@dataclass(frozen=True)
class Agreement:
    """What a comparison measured; ``ok`` False carries the one-line ``reason``."""

    ok: bool
    reason: str
    batches: tuple[int, ...]
    max_abs_diff: float
    top1_agreement: float | None = None
    accuracy_change: float | None = None
    relative_error: float | None = None
    #: the program's outputs for the compared rows (to score them without running again)
    outputs: np.ndarray | None = field(default=None, repr=False)

    def figures(self) -> dict[str, float]:
        """The measured figures (for the manifest's build info)."""
        out = {"max_abs_diff": self.max_abs_diff}
        for k in ("top1_agreement", "accuracy_change", "relative_error"):
            v = getattr(self, k)
            if v is not None:
                out[k] = float(v)
        return out


def verify_batches(max_batch: int, rows: int) -> tuple[int, ...]:
    """Batch sizes a program is checked at: 1, a middle size, and ``max_batch`` (at most
    ``rows``; each distinct)."""
    top = max(1, min(max_batch, rows))
    mid = max(1, min(top, 7 if top < 16 else top // 2 - 1))  # an odd size, off the grid
    return tuple(sorted({1, mid, top}))


def batch_plan(n: int, max_batch: int, fixed_batch: int | None = None) -> list[int]:
    """How ``n`` rows are cut into runs so that every row runs once and the program runs
    at several sizes: four single rows, an odd middle size when the rows allow it besides
    full runs, runs of ``max_batch``, and the rest as one shorter run. A fixed-batch
    program: its batch (the last run padded)."""
    if fixed_batch:
        return [min(fixed_batch, n - i) for i in range(0, n, fixed_batch)]
    sizes = verify_batches(max_batch, n)
    top, mid = sizes[-1], sizes[len(sizes) // 2]
    plan = [1] * min(4, n)
    left = n - len(plan)
    if mid not in (1, top) and left >= top + mid:
        plan.append(mid)
        left -= mid
    while left >= top:
        plan.append(top)
        left -= top
    if left:
        plan.append(left)
    return plan

@contextlib.contextmanager
def runtime_log() -> Iterator[Callable[[], str]]:
    """The device adapter's :func:`~toma_edge.device.adapter.native_log`, yielding the
    first ExecuTorch error line captured ("" when none). Host-side only."""
    with native_log() as text:
        yield lambda: _last_error_line(text())


_LOG_LINE = re.compile(r"^[EF] \d{2}:\d{2}:\d{2}\.\d+ executorch:(?P<msg>.*)$")


def _last_error_line(text: str) -> str:
    """The most telling ExecuTorch error line: the first E line (the cause; later ones
    repeat it as "execute failed"), without its timestamp."""
    errs = [m.group("msg").strip() for m in map(_LOG_LINE.match, text.splitlines()) if m]
    return errs[0] if errs else ""


def run_padded(program: Any, x: np.ndarray, batch: int, *, fixed: bool) -> np.ndarray:
    """``x`` through ``program`` in batches of ``batch`` rows; a fixed-batch program gets
    each short batch padded with copies of its last row and the padding cut off."""
    return run_plan(program, x, [min(batch, len(x) - i) for i in range(0, len(x), batch)],
                    pad_to=batch if fixed else None)


def run_plan(program: Any, x: np.ndarray, plan: list[int], *, pad_to: int | None = None
             ) -> np.ndarray:
    """``x`` through ``program`` in consecutive runs of the sizes in ``plan`` (each padded
    to ``pad_to`` rows with copies of its last row, when given)."""
    outs = []
    i = 0
    for n in plan:
        xb = x[i : i + n]
        i += n
        if pad_to:
            xb = pad_batch(xb, pad_to)
        outs.append(program.run([np.ascontiguousarray(xb)])[0][:n])
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def compare_program(
    program: Any,
    reference: Callable[[torch.Tensor], torch.Tensor],
    X: np.ndarray,
    *,
    task: str,
    max_batch: int,
    quantization: str,
    y: np.ndarray | None = None,
    tolerance: Tolerance = Tolerance(),
    fixed_batch: int | None = None,
    got: np.ndarray | None = None,
) -> Agreement:
    """Run ``X`` through ``program`` once, cut into runs of :func:`batch_plan` (1 row, an
    odd middle size, ``max_batch``), and compare with the eager ``reference`` on the same
    rows (in the same runs for int8-dynamic, whose outputs depend on batch mates). Never
    raises for a program that fails: the failure is the reason. ``got``: the program's
    outputs from an earlier call (then the program is not run again)."""
    tol = tolerance.for_kind(quantization)
    X = np.ascontiguousarray(X, dtype=np.float32)
    plan = batch_plan(len(X), max_batch, fixed_batch)
    batches = tuple(sorted(set(plan)))
    if got is None:
        with runtime_log() as last_line:
            try:
                got = run_plan(program, X, plan, pad_to=fixed_batch)
            except (TomaEdgeError, RuntimeError, ValueError) as e:
                native = last_line()
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                where = _failing_batch(program, X, plan, fixed_batch)
                why = f"fails in the runtime{where}: {msg}" + (
                    f" ({native})" if native and native not in msg else "")
                return Agreement(False, why, batches, float("inf"))
    # the captured eager graph guards its batch to max_batch, like the program
    eager_plan = plan if quantization == "int8-dynamic" or fixed_batch else \
        [min(max_batch, len(X) - i) for i in range(0, len(X), max_batch)]
    want = run_plan(_Eager(reference), X, eager_plan, pad_to=fixed_batch)
    a = _judge(got, want, task=task, y=y, tol=tol, batches=batches)
    return replace(a, outputs=got)


def _failing_batch(program: Any, X: np.ndarray, plan: list[int], fixed: int | None) -> str:
    """" at batch N": the first run size that fails, found by running one of each."""
    i = 0
    for n in plan:
        try:
            run_plan(program, X[i : i + n], [n], pad_to=fixed)
        except Exception:  # noqa: BLE001
            return f" at batch {n}"
        i += n
    return ""


class _Eager:
    """The eager reference with the program's ``run`` signature."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [self.fn(torch.as_tensor(arrays[0])).numpy()]


def _judge(got: np.ndarray, want: np.ndarray, *, task: str, y: np.ndarray | None,
           tol: Tolerance, batches: tuple[int, ...]) -> Agreement:
    at = f"(run at batches {', '.join(map(str, batches))})"
    if got.shape != want.shape:
        return Agreement(False, f"gives outputs of shape {got.shape[1:]} {at}, the eager model "
                         f"{want.shape[1:]}", batches, float("inf"))
    if not np.isfinite(got).all():
        bad = int((~np.isfinite(got)).any(axis=tuple(range(1, got.ndim))).sum())
        return Agreement(False, f"gives non-finite outputs for {bad} of {len(got)} rows {at}",
                         batches, float("inf"))
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if task == "classification":
        g, w = got.reshape(len(got), -1).argmax(1), want.reshape(len(want), -1).argmax(1)
        agree = float(np.mean(g == w)) if len(g) else 1.0
        change = None
        if y is not None:
            labels = np.asarray(y).reshape(-1)[: len(g)]
            change = float(np.mean(g == labels) - np.mean(w == labels))
        if agree < tol.min_agreement:
            extra = "" if change is None else f", accuracy {change:+.3f}"
            return Agreement(False, f"agrees with the eager model's top-1 class on "
                             f"{agree:.1%} of rows {at} (< {tol.min_agreement:.1%}{extra})",
                             batches, diff, agree, change)
        return Agreement(True, "", batches, diff, agree, change)
    scale = float(np.std(want))
    rms = float(np.sqrt(np.mean((got.astype(np.float64) - want) ** 2))) if got.size else 0.0
    rel = rms / scale if scale > 0 else (0.0 if rms == 0 else float("inf"))
    if rel > tol.max_error:
        return Agreement(False, f"differs from the eager model by {rel:.2%} of its output "
                         f"spread (RMS) {at} (> {tol.max_error:.2%})", batches, diff,
                         relative_error=rel)
    return Agreement(True, "", batches, diff, relative_error=rel)


def verify_export(program: Any, res: Any, X: np.ndarray, *, task: str, max_batch: int,
                  y: np.ndarray | None = None, tolerance: Tolerance = Tolerance()
                  ) -> Agreement:
    """``res`` (an ExportResult) loaded as ``program``: compared with its own eager model,
    then (quantized kinds) with the fp32 model it was quantized from, on the same program
    outputs; the first failure, else the comparison with its own eager model."""
    own = compare_program(program, res.reference, X, task=task, max_batch=max_batch,
                          quantization=res.quantization, y=y, tolerance=tolerance,
                          fixed_batch=res.fixed_batch)
    if not own.ok or res.quantization == "fp32" or res.fp32_reference is None:
        return own
    fp = compare_program(program, res.fp32_reference, X, task=task, max_batch=max_batch,
                         quantization="int8", y=y, tolerance=tolerance.against_fp32(),
                         fixed_batch=res.fixed_batch, got=own.outputs)
    if not fp.ok:
        why = fp.reason.replace("the eager model", "the fp32 model")
        return replace(fp, reason=f"{why}: its quantization is broken (calibration rows that "
                       "do not represent the data?)")
    return own
