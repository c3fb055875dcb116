"""Measure what each batch size really costs a device process (run as its own process).

    python -m toma_edge.device.measure dist/rpi4/model.pte --batches 1,32,256
    # {"adapter": "pybind", "baseline_rss_bytes": ..., "measured_peak_bytes": {"1": ..., ...}}

``measured_peak_bytes[b]`` is the peak RSS increase over the loaded program while running
a batch of ``b`` rows (XNNPACK's workspace included, which the program's memory plan
leaves out). Batches run in increasing order, so every figure includes what the smaller
ones left resident. Build records these in the manifest; the Predictor sizes batches by them.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

__all__ = ["read_status_bytes", "reset_peak", "measure_program"]


def read_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field such as VmRSS or VmHWM, in bytes (0 if unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset this process's VmHWM to the current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_program(path: str, batches: list[int], *, threads: int = 1, adapter: str = "auto") -> dict:
    from .adapter import load_program

    prog = load_program(path, threads=threads, adapter=adapter)
    spec = prog.inputs[0]
    row_shape = spec.shape[1:]
    dtype = np.dtype(spec.dtype)
    base = read_status_bytes("VmRSS")
    peaks: dict[str, int] = {}
    rng = np.random.default_rng(0)
    for b in sorted(set(batches)):
        x = rng.random((b, *row_shape)).astype(dtype)
        reset_peak()
        prog.run([x])
        prog.run([x])
        peaks[str(b)] = max(0, read_status_bytes("VmHWM") - base)
    return {"adapter": prog.adapter, "baseline_rss_bytes": base, "measured_peak_bytes": peaks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapter", default="auto")
    a = ap.parse_args(argv)
    res = measure_program(a.pte, [int(b) for b in a.batches.split(",")], threads=a.threads,
                          adapter=a.adapter)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
