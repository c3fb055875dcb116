"""One progress type (toma_edge.progress.Progress): run reports through it, and the CLI's
rich reporter implements it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toma_edge.cli.progress import RichReporter
from toma_edge.device.runner import run
from toma_edge.progress import NullProgress, Progress, as_progress


class Recorder(NullProgress):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object, object]] = []

    def phase(self, name: str, total: int | None = None) -> None:
        self.calls.append(("phase", name, total))

    def advance(self, n: int = 1, total: int | None = None) -> None:
        self.calls.append(("advance", n, total))

    def done(self) -> None:
        self.calls.append(("done", None, None))


def test_implementations_satisfy_the_protocol() -> None:
    for p in (NullProgress(), Recorder(), RichReporter(), RichReporter(plain_lines=False)):
        assert isinstance(p, Progress)
    assert isinstance(as_progress(None), NullProgress)
    rec = Recorder()
    assert as_progress(rec) is rec


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_run_reports_one_phase_advanced_by_the_rows(example_bundle: Path, tmp_path: Path,
                                                    suffix: str) -> None:
    X = np.random.default_rng(5).random((2500, 10), dtype=np.float32)
    src = tmp_path / f"in{suffix}"
    if suffix == ".npy":
        np.save(src, X)
    else:
        np.savetxt(src, X, delimiter=",", fmt="%.9g")
    rec = Recorder()
    s = run(example_bundle, str(src), str(tmp_path / "out.npy"), threads=1, budget="8GiB",
            depth=2, progress=rec)
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "phase" and rec.calls[0][1] == "inference"
    assert kinds[-1] == "done" and kinds.count("done") == 1 and kinds.count("phase") == 1
    steps = [c for c in rec.calls if c[0] == "advance"]
    assert sum(int(c[1]) for c in steps) == s.rows == 2500  # type: ignore[call-overload]
    want_total = 2500 if suffix == ".npy" else None  # known before reading for .npy only
    assert rec.calls[0][2] == want_total and all(c[2] == want_total for c in steps)


def test_a_failed_run_does_not_mark_the_phase_done(example_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "bad.csv"
    src.write_text("1,2,3\n")  # three values for a ten-wide input
    rec = Recorder()
    with pytest.raises(Exception, match="line 1"):
        run(example_bundle, str(src), str(tmp_path / "out.csv"), threads=1, budget="8GiB",
            progress=rec)
    assert [c[0] for c in rec.calls] == ["phase"]


def test_reporter_off_a_terminal() -> None:
    """Piped: build's reporter prints each phase as a line, run's prints nothing and does
    not even import rich."""
    code = (
        "import sys\n"
        "from toma_edge.cli.progress import RichReporter\n"
        "r = RichReporter(plain_lines=False, rate_unit='rows', transient=True)\n"
        "r.phase('inference', 10); r.advance(10); r.done(); r.stop()\n"
        "assert 'rich' not in sys.modules, 'rich imported'\n"
        "b = RichReporter()\n"
        "b.phase('training', total=3); b.advance(); b.phase('exporting'); b.done()\n"
        "b.info('a [bold]table[/bold] row')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    assert p.stderr.splitlines() == ["training...", "exporting...", "a [bold]table[/bold] row"]
