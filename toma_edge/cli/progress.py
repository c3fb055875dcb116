"""The CLI's :class:`~toma_edge.progress.Progress`: rich bars on a terminal.

    rep = RichReporter()                             # build: phase lines when piped
    rep.phase("train", total=30); rep.advance(); rep.done()
    bar = RichReporter(plain_lines=False, rate_unit="rows", transient=True)   # run
    run("dist/rpi4", "rows.csv", "out.csv", progress=bar)
    bar.stop()

Off a terminal a reporter prints each phase as ``name...`` (``plain_lines``, build and
compress) or nothing at all (``run``, which then does not even import rich: ~10 ms of a
Pi's start-up). Messages (:meth:`RichReporter.info`) always go to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from ..progress import NullProgress

__all__ = ["RichReporter"]


def _may_be_terminal() -> bool:
    """Whether rich could draw on stderr (a tty, or rich's FORCE_TERMINAL/TTY_COMPATIBLE)."""
    return bool(sys.stderr.isatty() or os.environ.get("FORCE_TERMINAL")
                or os.environ.get("TTY_COMPATIBLE"))


class RichReporter(NullProgress):
    """Progress on a terminal (rich), per phase: a spinner, the phase name, a bar and
    ``done/total`` when the total is known or ``rate_unit`` is set, ``<rate> <unit>/s``
    with ``rate_unit``, and the elapsed time. ``transient`` bars vanish when stopped."""

    def __init__(self, *, plain_lines: bool = True, rate_unit: str | None = None,
                 transient: bool = False) -> None:
        self.plain_lines, self.rate_unit, self.transient = plain_lines, rate_unit, transient
        self.console: Any = None
        self.terminal = False
        self._progress: Any = None
        self._task: Any = None
        self._t0 = 0.0
        if not plain_lines and not _may_be_terminal():
            return  # silent off a terminal: don't pay for importing rich
        from rich.console import Console

        self.console = Console(stderr=True)
        self.terminal = bool(self.console.is_terminal)

    def phase(self, name: str, total: int | None = None) -> None:
        self.done()
        if not self.terminal:
            if self.plain_lines:
                self.info(f"{name}...")
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        cols: list[Any] = [SpinnerColumn(finished_text="[green]✓"),
                           TextColumn("{task.description}")]
        if total or self.rate_unit:
            cols += [BarColumn(), MofNCompleteColumn()]
        if self.rate_unit:
            cols.append(TextColumn(f"{{task.fields[rate]}} {self.rate_unit}/s"))
        cols.append(TimeElapsedColumn())
        self._progress = Progress(*cols, console=self.console, transient=self.transient)
        self._progress.start()
        self._task = self._progress.add_task(name, total=total, rate="-")
        self._t0 = time.perf_counter()

    def advance(self, n: int = 1, total: int | None = None) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._task, n)
        fields: dict[str, Any] = {}
        if total is not None:
            fields["total"] = total
        if self.rate_unit:
            done = self._progress.tasks[0].completed
            fields["rate"] = f"{done / max(1e-9, time.perf_counter() - self._t0):,.0f}"
        if fields:
            self._progress.update(self._task, **fields)

    def done(self) -> None:
        if self._progress is not None:
            task = self._progress.tasks[0]
            total = task.total or task.completed or 1
            self._progress.update(self._task, total=total, completed=total)
            self._progress.stop()
            self._progress = None

    def stop(self) -> None:
        """Stop the display as it is (after a failure: the phase is not marked done)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def info(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg, markup=False, highlight=False)
        else:
            click.echo(msg, err=True)
