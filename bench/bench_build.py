"""Build time of the built-in example, this code against a baseline commit, idle and with
two other busy processes, each build in a fresh process, side by side in one run.

    python bench/bench_build.py                        # baseline 8f3eb98 (before issue 14)
    python bench/bench_build.py --baseline HEAD~3 --repeats 2 --busy 2

The baseline is the named commit's tree (``git archive``) put first on PYTHONPATH of its
build processes; both run the same interpreter and installed packages. "Loaded" starts
``--busy`` processes that spin on a core each for the whole build (another build, a
service). Builds alternate baseline / current so drift in the machine hits both.
Reports wall seconds per build (process start included) and current / baseline ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tree(commit: str, into: Path) -> Path:
    """The commit's files under ``into`` (symlinks kept: toma_edge/host -> ../host)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _build_once(code_root: Path | None, out: Path) -> float:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # what a user's shell has: torch's default threads
    if code_root is not None:
        env["PYTHONPATH"] = str(code_root)
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "toma_edge.cli", "build", "--target", "rpi",
                        "--out", str(out)], capture_output=True, text=True, env=env,
                       cwd=str(code_root or REPO))
    secs = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"build failed ({code_root or 'current'}): {p.stderr.strip()[-400:]}")
    return secs


def _busy(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="8f3eb98")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--busy", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-build-") as td:
        base = _tree(args.baseline, Path(td) / "baseline")
        rows: dict[str, dict[str, list[float]]] = {}
        for load in ("idle", "loaded"):
            procs = _busy(args.busy) if load == "loaded" else []
            try:
                times: dict[str, list[float]] = {"baseline": [], "current": []}
                for _ in range(args.repeats):
                    for name, root in (("baseline", base), ("current", None)):
                        secs = _build_once(root, Path(td) / f"out-{name}")
                        times[name].append(secs)
                        print(f"{load:7s} {name:9s} {secs:6.1f} s", flush=True)
                rows[load] = times
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    print(f"\nbuilt-in example, toma-edge build --target rpi, {os.cpu_count()} cores; "
          f"baseline {args.baseline}; loaded = {args.busy} busy processes")
    print(f"{'':8s}{'baseline s':>12s}{'current s':>12s}{'ratio':>8s}")
    out = {}
    for load, times in rows.items():
        b, c = statistics.median(times["baseline"]), statistics.median(times["current"])
        out[load] = {"baseline_s": b, "current_s": c, "ratio": c / b}
        print(f"{load:8s}{b:12.1f}{c:12.1f}{c / b:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
