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

Rows run at batch 1, at a middle size and at ``max_batch`` (a program exported with a
fixed batch runs padded to it), so a program that only fails at some batch sizes is
caught here, not on the device. A runtime error is caught and becomes the reason, with
the runtime's own last log line (which names the failing executor and its message).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

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
    extra: dict[str, float] = field(default_factory=dict)

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


@contextlib.contextmanager
def runtime_log() -> Iterator[Callable[[], str]]:
    """Capture what native code writes to fd 2 (ExecuTorch's log lines) while inside;
    yields a function returning the last error line captured ("" when none). Host-side
    only: fd 2 is the process's, so nothing else should be writing there meanwhile."""
    try:
        import sys

        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:
        yield lambda: ""
        return
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            def last() -> str:
                f.flush()
                f.seek(0)
                return _last_error_line(f.read().decode("utf-8", "replace"))

            yield last
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_LOG_LINE = re.compile(r"^[EF] \d{2}:\d{2}:\d{2}\.\d+ executorch:(?P<msg>.*)$")


def _last_error_line(text: str) -> str:
    """The most telling ExecuTorch error line: the first E line (the cause; later ones
    repeat it as "execute failed"), without its timestamp."""
    errs = [m.group("msg").strip() for m in map(_LOG_LINE.match, text.splitlines()) if m]
    return errs[0] if errs else ""


def run_padded(program: Any, x: np.ndarray, batch: int, *, fixed: bool) -> np.ndarray:
    """``x`` through ``program`` in batches of ``batch`` rows; a fixed-batch program gets
    each short batch padded with copies of its last row and the padding cut off."""
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        n = len(xb)
        if fixed and n < batch:
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch - n, axis=0)])
        outs.append(program.run([np.ascontiguousarray(xb)])[0][:n])
    return np.concatenate(outs)


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
) -> Agreement:
    """Run ``X`` through ``program`` at :func:`verify_batches` and compare each with the
    eager ``reference`` on the same batches (int8-dynamic outputs depend on batch mates).
    Never raises for a program that fails: the failure is the reason."""
    tol = tolerance.for_kind(quantization)
    X = np.ascontiguousarray(X, dtype=np.float32)
    batches = (fixed_batch,) if fixed_batch else verify_batches(max_batch, len(X))
    worst: Agreement | None = None
    diffs: list[float] = []
    for b in batches:
        with runtime_log() as last_line:
            try:
                got = run_padded(program, X, b, fixed=fixed_batch is not None)
            except (TomaEdgeError, RuntimeError, ValueError) as e:
                native = last_line()
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                why = f"fails in the runtime at batch {b}: {msg}" + (
                    f" ({native})" if native and native not in msg else "")
                return Agreement(False, why, batches, float("inf"))
        want = run_padded(_Eager(reference), X, b, fixed=fixed_batch is not None)
        a = _judge(got, want, task=task, y=y, tol=tol, batch=b, batches=batches)
        diffs.append(a.max_abs_diff)
        if not a.ok:
            return a
        if worst is None or _worse(a, worst):
            worst = a
    assert worst is not None
    return Agreement(True, "", batches, max(diffs), worst.top1_agreement,
                     worst.accuracy_change, worst.relative_error)


class _Eager:
    """The eager reference with the program's ``run`` signature."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [self.fn(torch.as_tensor(arrays[0])).numpy()]


def _worse(a: Agreement, b: Agreement) -> bool:
    if a.top1_agreement is not None and b.top1_agreement is not None:
        return a.top1_agreement < b.top1_agreement
    return (a.relative_error or 0.0) > (b.relative_error or 0.0)


def _judge(got: np.ndarray, want: np.ndarray, *, task: str, y: np.ndarray | None,
           tol: Tolerance, batch: int, batches: tuple[int, ...]) -> Agreement:
    at = f"at batch {batch}"
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
    then (quantized kinds) with the fp32 model it was quantized from; the first failure,
    else the comparison with its own eager model."""
    own = compare_program(program, res.reference, X, task=task, max_batch=max_batch,
                          quantization=res.quantization, y=y, tolerance=tolerance,
                          fixed_batch=res.fixed_batch)
    if not own.ok or res.quantization == "fp32" or res.fp32_reference is None:
        return own
    fp = compare_program(program, res.fp32_reference, X, task=task, max_batch=max_batch,
                         quantization=res.quantization, y=y,
                         tolerance=tolerance.against_fp32(), fixed_batch=res.fixed_batch)
    if not fp.ok:
        why = fp.reason.replace("the eager model", "the fp32 model")
        return Agreement(False, f"{why}: its quantization is broken (calibration rows that do "
                         "not represent the data?)", fp.batches, fp.max_abs_diff,
                         fp.top1_agreement, fp.accuracy_change, fp.relative_error)
    return own
