"""Measure an exported program on this host: its peak memory in a fresh device process,
and its batch-1 latency through the runtime.

    from toma_edge.host.measure import measure_peaks, start_peak_measurement
    from toma_edge.host.measure import finish_peak_measurement
    measure_peaks(Path("model.pte"), max_batch=256)
    # {"adapter": "native", "measured_peak_bytes": {"1": ..., "8": ..., "256": ...}}
    proc = start_peak_measurement(Path("a.pte"), (1,))   # runs beside the next export
    finish_peak_measurement(proc)

The peak is the RSS increase over the loaded program, per batch size, of a fresh
``python -m toma_edge.device.measure`` (one thread, glibc mmap threshold 64 KiB so freed
buffers return to the system): the device runtime, not this process with torch loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError

__all__ = [
    "peak_batches",
    "start_peak_measurement",
    "finish_peak_measurement",
    "measure_peaks",
    "latency_ms",
]


def peak_batches(max_batch: int) -> list[int]:
    """The batch sizes a bundle's peak is measured at: 1, 8, 32, 64, 128 below
    ``max_batch``, and ``max_batch``."""
    return sorted({1, *[b for b in (8, 32, 64, 128) if b < max_batch], max_batch})


def start_peak_measurement(pte_path: Path, batches: Iterable[int] = (1,)) -> subprocess.Popen[str]:
    """Start measuring the peak RSS increase over the loaded program, per batch size, in a
    fresh device process; :func:`finish_peak_measurement` collects it."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "toma_edge.device.measure", str(pte_path),
           "--batches", ",".join(str(b) for b in batches)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_peak_measurement(proc: subprocess.Popen[str], *, timeout_s: float = 300
                            ) -> dict[str, Any]:
    """The JSON the device's measure module printed (adapter, measured_peak_bytes)."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.communicate()
        raise BundleError(f"measuring the program's memory took over {timeout_s:g} s") from e
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"the exported program does not run in the device runtime: {last}")
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure_peaks(pte_path: Path, max_batch: int) -> dict[str, Any]:
    """Peak RSS increase at each of :func:`peak_batches`, measured in a fresh device process."""
    return finish_peak_measurement(start_peak_measurement(pte_path, peak_batches(max_batch)))


def latency_ms(program: Any, x: np.ndarray, *, repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of one forward of ``x`` through a loaded program, milliseconds."""
    x = np.ascontiguousarray(x)
    for _ in range(warmup):
        program.run([x])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        program.run([x])
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)
