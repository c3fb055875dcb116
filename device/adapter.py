"""The one device module that touches torch: load an ExecuTorch program, run a method.

    from toma_edge.device.adapter import load_program
    prog = load_program("dist/rpi4/model.pte", threads=4)
    (y,) = prog.run([np.random.rand(8, 10).astype(np.float32)])
    prog.adapter                                       # "pybind"

Everything around it (Predictor, loaders, service, agent) speaks numpy arrays. The
``pybind`` adapter uses ExecuTorch's native pybindings module with torch alone: importing
``executorch.runtime`` would pull in the whole export stack (seconds and ~130 MiB more).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BundleError, InputError

__all__ = ["Program", "TensorInfo", "load_program", "available_adapters"]

_DTYPES = {"Float": np.float32, "Long": np.int64, "Int": np.int32, "Byte": np.uint8, "Char": np.int8}


@dataclass(frozen=True)
class TensorInfo:
    """A method input or output as the program plans it (shape at the maximum batch)."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int


class Program(Protocol):
    """A loaded program: what the Predictor needs from any adapter."""

    adapter: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]: ...


@contextlib.contextmanager
def _quiet_native() -> Iterator[None]:
    """Silence ExecuTorch's native log lines (cpuinfo, threadpool) on fd 2 while loading,
    so a CLI error stays one line; TOMA_EDGE_NATIVE_LOGS=1 keeps them."""
    if os.environ.get("TOMA_EDGE_NATIVE_LOGS") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_threads_lock = threading.Lock()
_threads_set: int | None = None


def _parse_info(text: str) -> TensorInfo:
    # pybindings print TensorInfo(sizes=[256, 10], dtype=Float, is_memory_planned=True, nbytes=10240)
    import re

    m = re.search(r"sizes=\[([0-9, ]*)\], dtype=(\w+).*nbytes=(\d+)", text)
    if not m:
        raise BundleError(f"cannot read tensor info from the program: {text}")
    shape = tuple(int(s) for s in m.group(1).split(",") if s.strip())
    dt = np.dtype(_DTYPES.get(m.group(2), np.float32)).name
    return TensorInfo(shape=shape, dtype=dt, nbytes=int(m.group(3)))


class PybindProgram:
    """ExecuTorch through ``executorch.extension.pybindings._C`` (needs torch)."""

    adapter = "pybind"

    def __init__(self, source: str | Path | bytes, *, threads: int | None = None) -> None:
        import torch  # noqa: F401  (the pybindings need torch's libraries loaded first)
        from executorch.extension.pybindings import _C

        global _threads_set
        with _threads_lock, _quiet_native():
            # XNNPACK's pool must be sized before a method is loaded
            if threads and threads != _threads_set:
                _C._unsafe_reset_threadpool(int(threads))
                _threads_set = int(threads)
            try:
                if isinstance(source, (bytes, bytearray)):
                    # the module reads the program from this buffer for as long as it
                    # lives and does not keep it alive itself: hold it here
                    self._buffer = bytes(source)
                    self._module = _C._load_for_executorch_from_buffer(self._buffer)
                else:
                    self._module = _C._load_for_executorch(str(source))
            except RuntimeError as e:
                raise BundleError(f"{source if not isinstance(source, bytes) else '<bytes>'}: "
                                  f"ExecuTorch cannot load the program: {e}") from e
        try:
            meta = self._module.method_meta("forward")
        except RuntimeError as e:
            raise BundleError(f"the program has no 'forward' method: {e}") from e
        self.inputs = tuple(_parse_info(str(meta.input_tensor_meta(i))) for i in range(meta.num_inputs()))
        self.outputs = tuple(_parse_info(str(meta.output_tensor_meta(i))) for i in range(meta.num_outputs()))
        self._torch = torch
        self._lock = threading.Lock()  # an ExecuTorch method is not reentrant

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        ts = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        with self._lock:
            try:
                outs = self._module.forward(ts, False)
            except RuntimeError as e:
                raise InputError(f"ExecuTorch method failed: {e}") from e
            # copy out: with clone_outputs=False the outputs alias the program's planned
            # memory, which the next call overwrites (one copy instead of two)
            return [o.numpy().copy() for o in outs]


    def run_into(self, x: np.ndarray, out: np.ndarray) -> None:
        """Run a one-input, one-output method on ``x`` and copy its result into ``out``.

        The lean path of the Predictor's loop: no lists, no intermediate copy. ``x``
        must be C-contiguous; ``out`` must have the output's shape for ``len(x)`` rows.
        """
        with self._lock:
            try:
                (o,) = self._module.forward((self._torch.from_numpy(x),), False)
            except RuntimeError as e:
                raise InputError(f"ExecuTorch method failed: {e}") from e
            out[...] = o.numpy()  # copy before the next call reuses the planned memory

    def run_batches_into(self, x: np.ndarray, out: np.ndarray, size: int) -> None:
        """Run ``x`` in consecutive batches of ``size`` rows (one-input, one-output),
        each result into the matching rows of ``out``; the lock is taken once.

        The Predictor's hot loop: per batch only the method call and one copy remain. The
        input batches are cut in one C call (``Tensor.split``, views, no copy), and the
        method returns its output uncloned (``clone_outputs=False``: a view of the
        program's planned memory), copied once into ``out`` before the next call reuses
        it; at batch 32 this is ~10% of the per-batch time.
        """
        fwd = self._module.forward
        with self._lock:
            try:
                i = 0
                for xb in self._torch.from_numpy(x).split(size):
                    (o,) = fwd((xb,), False)
                    out[i : i + size] = o.numpy()
                    i += size
            except RuntimeError as e:
                raise InputError(f"ExecuTorch method failed: {e}") from e


def available_adapters() -> list[str]:
    """Adapters that can run here, best first."""
    out = []
    try:
        import importlib.util

        if importlib.util.find_spec("executorch.extension.pybindings._C") is not None:
            out.append("pybind")
    except (ImportError, ValueError):
        pass
    return out


def load_program(
    source: str | Path | bytes, *, threads: int | None = None, adapter: str = "auto"
) -> Any:
    """Load a .pte (path or bytes) with the best adapter available (or the one named)."""
    have = available_adapters()
    if adapter == "auto":
        if not have:
            raise BundleError("no ExecuTorch runtime adapter is installed; install executorch")
        adapter = have[0]
    if adapter == "pybind":
        return PybindProgram(source, threads=threads)
    raise BundleError(f"unknown runtime adapter '{adapter}'; available: {', '.join(have) or 'none'}")
