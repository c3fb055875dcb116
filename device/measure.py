"""Measure what each batch size really costs a device process (run as its own process).

    python -m toma_edge.device.measure dist/rpi4/model.pte --batches 1,32,256
    # {"adapter": "native", "baseline_rss_bytes": ..., "measured_peak_bytes": {"1": ..., ...}}

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

__all__ = ["measure_program"]


def measure_program(path: str, batches: list[int], *, threads: int = 1,
                    adapter: str = "auto") -> dict:
    """Load ``path`` and return the peak RSS increase over the loaded program per batch
    size, read through the process-wide peak probe (VmHWM reset before each batch)."""
    from ..probes import peak_probe, rss_bytes
    from .adapter import load_program

    prog = load_program(path, threads=threads, adapter=adapter)
    spec = prog.inputs[0]
    row_shape = spec.shape[1:]
    dtype = np.dtype(spec.dtype)
    base = rss_bytes()
    peaks: dict[str, int] = {}
    rng = np.random.default_rng(0)
    for b in sorted(set(batches)):
        x = rng.random((b, *row_shape)).astype(dtype)
        with peak_probe().measure() as m:
            prog.run([x])
            prog.run([x])
        peaks[str(b)] = max(0, m.peak_bytes - base)
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
