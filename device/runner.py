"""``toma-edge run``: streamed batch inference from a file (or stdin) to a file (or stdout).

    from toma_edge.device.runner import run
    s = run("dist/rpi4", "rows.csv", "out.csv", budget="512MiB", threads=1)
    print(s.rows, s.rows_per_s, s.peak_rss_bytes <= s.budget_bytes)
    for line in s.lines(): print(line)                  # the closing summary
    run("dist/rpi4", "rows.npy", "out.npy", skip_bad=True).skipped
    run("dist/rpi4", "rows.csv", "out.csv", progress=my_progress)   # a toma_edge.progress.Progress

Reading and parsing run in a background thread, at most ``depth`` chunks ahead of the
model (blocks sized from the working budget left once a batch is paid), and outputs are
written chunk by chunk, so memory does not grow with the input. A bad row stops the run
with an :class:`~toma_edge.errors.InputError` naming its line; with ``skip_bad`` it is
skipped and counted. An output file is written to a temporary file beside it and moved
into place only when the run finished: a run that fails (bad row, Ctrl-C, error) leaves
the output path as it was (stdout gets the CSV/JSON lines written before the failure).
An output that is the input file (also through links) is refused before anything runs.
``seconds`` and ``rows_per_s`` are timed from the first row read to the last row
written (start-up, ``startup_s``, excluded). Progress: one phase, ``inference``, advanced
by the rows of each chunk written (its total known before reading for .npy only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..budget import format_size
from ..errors import InputError
from ..probes import enable_exact_peaks, peak_probe, process_start_time
from ..progress import Progress, as_progress
from .loaders import (
    BadRow,
    Format,
    Reader,
    block_bytes_for,
    detect_format,
    line_bytes_for,
    open_reader,
    prefetch,
)
from .writers import Writer, open_writer, same_file

if TYPE_CHECKING:
    from .predictor import Predictor

__all__ = ["RunSummary", "run"]


@dataclass(frozen=True)
class RunSummary:
    """What a run did. Bytes, seconds, rows."""

    rows: int
    skipped: int
    bad_rows: tuple[BadRow, ...]
    seconds: float
    startup_s: float
    peak_rss_bytes: int
    baseline_bytes: int
    budget_bytes: int
    batch_size: int
    threads: int
    input_format: str
    output_format: str

    @property
    def rows_per_s(self) -> float:
        """Rows written per second, first row read to last row written."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """The closing summary, for people."""
        over = self.peak_rss_bytes > self.budget_bytes
        out = [
            f"rows {self.rows:,} in {self.seconds:.2f} s ({self.rows_per_s:,.0f} rows/s; "
            f"start-up {self.startup_s:.2f} s)",
            f"peak RSS {format_size(self.peak_rss_bytes)} of the {format_size(self.budget_bytes)} "
            f"budget ({self.peak_rss_bytes / self.budget_bytes:.0%}"
            + ("; OVER BUDGET" if over else "")
            + f"); baseline {format_size(self.baseline_bytes)}, batch {self.batch_size}, "
            f"{self.threads} thread(s)",
        ]
        if self.skipped:
            shown = "; ".join(f"line {b.line}: {b.reason}" for b in self.bad_rows[:3])
            out.append(f"skipped {self.skipped:,} bad row(s) ({shown}"
                       + (", ..." if self.skipped > 3 else "") + ")")
        return out


def run(
    bundle: str | Path,
    input: str,
    output: str,
    *,
    fmt: str | None = None,
    budget: int | str | None = None,
    threads: int | None = None,
    skip_bad: bool = False,
    trust_key: str | Path | None = None,
    depth: int = 4,
    progress: Progress | None = None,
    exact_peaks: bool = True,
    t_start: float | None = None,
) -> RunSummary:
    """Run ``bundle`` over every row of ``input`` and write the outputs to ``output``
    (``-``: stdin/stdout; the format comes from the extension, else ``fmt``, else CSV).

    ``budget``: the whole process's peak RSS budget (default: the target's). ``exact_peaks``
    makes glibc return large freed blocks at once (so RSS readings are honest).
    ``t_start``: a ``time.perf_counter()`` reading to time ``startup_s`` from (default:
    this process's start, so ``startup_s`` covers interpreter, imports and loading).
    ``progress``: told of the ``inference`` phase and the rows of each chunk written.
    Raises BundleError, BudgetError or InputError; then ``output`` is as it was before
    (a file), or holds the CSV/JSON lines of the rows before the bad one (stdout).
    """
    t0 = process_start_time() if t_start is None else t_start
    in_fmt, out_fmt = detect_format(input, fmt), detect_format(output, fmt)
    if same_file(input, output):
        raise InputError(f"{output}: the output is the input file; write the outputs to "
                         "another file")
    if exact_peaks:
        enable_exact_peaks()
    from .predictor import Predictor  # loads the runtime: at run time only

    if in_fmt == "csv":
        from .loaders import csv_block_parser

        csv_block_parser()  # import the CSV parser now: part of the baseline, not of the work
    pred = Predictor(bundle, budget=budget, threads=threads, trust_key=trust_key)
    reader = open_reader(input, row_shape=pred.input_spec.row_shape, fmt=in_fmt,
                         block_bytes=block_bytes_for(pred.free_bytes, depth=depth),
                         skip_bad=skip_bad,
                         max_line_bytes=line_bytes_for(pred.input_spec.width, pred.free_bytes))
    t1 = time.perf_counter()
    startup = (time.time() - t0) if t_start is None else (t1 - t0)
    try:
        done = _stream(pred, reader, output, out_fmt, depth=depth,
                       progress=as_progress(progress))
    finally:
        reader.close()
    seconds = time.perf_counter() - t1
    return RunSummary(
        rows=done, skipped=reader.skipped, bad_rows=tuple(reader.bad_rows), seconds=seconds,
        startup_s=startup, peak_rss_bytes=peak_probe().running_peak_bytes(),
        baseline_bytes=pred.baseline_bytes, budget_bytes=pred.budget.bytes,
        batch_size=pred.batch_size, threads=pred.threads, input_format=in_fmt,
        output_format=out_fmt,
    )


def _stream(pred: Predictor, reader: Reader, output: str, out_fmt: Format, *, depth: int,
            progress: Progress) -> int:
    """Predict every chunk of ``reader`` into ``output``; the rows written. The output is
    moved into place only when every row was written (else it keeps what it held)."""
    classes = pred.manifest.task == "classification"
    writer: Writer | None = None
    done = 0
    progress.phase("inference", reader.total_rows)
    try:
        for chunk in prefetch(reader, depth=depth):
            if writer is None:  # after the first block: the CSV header is known
                writer = open_writer(output, n_outputs=pred.n_outputs, fmt=out_fmt,
                                     header=reader.had_header, classes=classes)
            p = pred.predict(chunk.rows, first_row=chunk.first_line,
                             finite_checked=chunk.finite_checked)
            writer.write(p.outputs, p.classes)
            done += len(p)
            progress.advance(len(p), total=reader.total_rows)
        if writer is None:  # empty input: still write an (empty) output
            writer = open_writer(output, n_outputs=pred.n_outputs, fmt=out_fmt,
                                 header=reader.had_header, classes=classes)
        writer.close()  # moved into place: the run finished
        progress.done()
    except BaseException:
        if writer is not None:
            writer.abort()  # the output path keeps what it held; no temporary file stays
        raise
    return done
