"""Load an ExecuTorch program and run a method: the device's one seam to the runtime.

    from toma_edge.device.adapter import load_program
    prog = load_program("dist/rpi4/model.pte", threads=4)
    (y,) = prog.run([np.random.rand(8, 10).astype(np.float32)])
    prog.adapter                                       # "native" (or "pybind")

Everything around it (Predictor, loaders, service, agent) speaks numpy arrays. Two
adapters, chosen automatically, best first:

- ``native``: ``toma_edge_native``, our small C++ module over the runtime libraries of the
  executorch wheel (runtime, optimized kernels, XNNPACK, thread pool), which it carries.
  No torch and no executorch Python package: this is what a device installs.
- ``pybind``: ExecuTorch's own pybindings module, which needs torch (the host install has
  it). Importing ``executorch.runtime`` instead would pull in the whole export stack.

``TOMA_EDGE_ADAPTER=pybind`` (or ``native``) forces one.

A program's native memory goes with ``prog.close()``; :func:`release_native_programs`
closes every live native program, and runs by itself at interpreter exit (atexit), so
nanobind's leak check finds nothing even where a daemon thread (a server's) still holds
a program when the process ends. ``serve`` calls it on shutdown.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BundleError, InputError

__all__ = ["Program", "TensorInfo", "load_program", "available_adapters",
           "native_executorch_version", "release_native_programs"]

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


def _size_threadpool(threads: int | None, reset: Any) -> None:
    """Size XNNPACK's one process-wide pool (both adapters share its library) before a
    method is loaded; only when asked and different. Call with ``_threads_lock`` held."""
    global _threads_set
    if threads and threads != _threads_set:
        reset(int(threads))
        _threads_set = int(threads)


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

        with _threads_lock, _quiet_native():
            _size_threadpool(threads, _C._unsafe_reset_threadpool)
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


_live_native: weakref.WeakSet[NativeProgram] = weakref.WeakSet()
_live_lock = threading.Lock()
_atexit_registered = False


def release_native_programs() -> int:
    """Close every native program still alive in this process; returns how many.

    Call it when a process is done serving (``serve``'s shutdown does), before the
    interpreter exits: a program held by a daemon thread or a reference cycle is then
    freed while nanobind can still free it, so its leak check prints nothing. Programs
    closed here answer any later ``run`` with a BundleError. Registered with atexit the
    first time a native program is loaded; safe to call more than once.
    """
    with _live_lock:
        progs = list(_live_native)
    for p in progs:
        p.close()
    return len(progs)


def _track_native(prog: NativeProgram) -> None:
    global _atexit_registered
    with _live_lock:
        _live_native.add(prog)
        if not _atexit_registered:
            atexit.register(release_native_programs)
            _atexit_registered = True


class NativeProgram:
    """ExecuTorch through ``toma_edge_native`` (no torch). ``close()`` frees the native
    program (see :func:`release_native_programs`)."""

    adapter = "native"

    def __init__(self, source: str | Path | bytes, *, threads: int | None = None) -> None:
        with _threads_lock, _quiet_native():
            native = _native()
            _size_threadpool(threads, native.set_threads)
            try:
                self._prog = native.Program(bytes(source) if isinstance(source, (bytes, bytearray))
                                            else str(source))
            except native.ExecuTorchError as e:
                where = "<bytes>" if isinstance(source, (bytes, bytearray)) else source
                raise BundleError(f"{where}: ExecuTorch cannot load the program: {e}") from e
        self.inputs = tuple(_info(s) for s in self._prog.inputs)
        self.outputs = tuple(_info(s) for s in self._prog.outputs)
        self._error = native.ExecuTorchError
        _track_native(self)

    def close(self) -> None:
        """Free the native program now (idempotent). A call already running keeps its
        own reference and finishes; later calls raise BundleError."""
        self._prog = None
        with _live_lock:
            _live_native.discard(self)

    @property
    def closed(self) -> bool:
        return self._prog is None

    def _native_prog(self) -> Any:
        prog = self._prog
        if prog is None:
            raise BundleError("the model was released (the process is shutting down); "
                              "load the bundle again")
        return prog

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        prog = self._native_prog()
        try:
            return list(prog.run([np.ascontiguousarray(a) for a in arrays]))
        except (self._error, ValueError, TypeError) as e:
            raise InputError(f"ExecuTorch method failed: {e}") from e

    def run_into(self, x: np.ndarray, out: np.ndarray) -> None:
        """Run a one-input, one-output method on ``x``, its result into ``out``."""
        self.run_batches_into(x, out, max(1, len(x)))

    def run_batches_into(self, x: np.ndarray, out: np.ndarray, size: int) -> None:
        """Run ``x`` in consecutive batches of ``size`` rows (one-input, one-output),
        each result into the matching rows of ``out``; one call into C++, GIL released."""
        prog = self._native_prog()
        try:
            prog.run_batches_into(x, out, int(size))
        except (self._error, ValueError, TypeError) as e:
            raise InputError(f"ExecuTorch method failed: {e}") from e


def _info(spec: Any) -> TensorInfo:
    return TensorInfo(shape=tuple(int(v) for v in spec.shape), dtype=str(spec.dtype),
                      nbytes=int(spec.nbytes))


def _native() -> Any:
    with _quiet_native():  # the runtime's cpuinfo logs on first load
        import toma_edge_native

    return toma_edge_native


def native_executorch_version() -> str | None:
    """The executorch release the native adapter carries, or None where it is not built."""
    try:
        return str(_native().EXECUTORCH_VERSION)
    except ImportError:
        return None


def available_adapters() -> list[str]:
    """Adapters that can run here, best first (``TOMA_EDGE_ADAPTER`` narrows it to one)."""
    import importlib.util

    out = []
    for name, module in (("native", "toma_edge_native"),
                         ("pybind", "executorch.extension.pybindings._C")):
        try:
            if importlib.util.find_spec(module) is not None:
                out.append(name)
        except (ImportError, ValueError):
            pass
    forced = _forced_adapter()
    if forced:
        return [forced] if forced in out else []
    return out


def _forced_adapter() -> str | None:
    """The adapter ``TOMA_EDGE_ADAPTER`` names, or None for automatic."""
    forced = os.environ.get("TOMA_EDGE_ADAPTER", "").strip()
    return forced if forced and forced != "auto" else None


def load_program(
    source: str | Path | bytes, *, threads: int | None = None, adapter: str = "auto"
) -> Any:
    """Load a .pte (path or bytes) with the best adapter available (or the one named)."""
    have = available_adapters()
    if adapter == "auto":
        if not have:
            forced = _forced_adapter()
            raise BundleError(
                f"the runtime adapter '{forced}' (TOMA_EDGE_ADAPTER) is not installed" if forced
                else "no ExecuTorch runtime adapter is installed; install toma-edge-native "
                "(the device install) or toma-edge[host]")
        adapter = have[0]
    if adapter == "native":
        return NativeProgram(source, threads=threads)
    if adapter == "pybind":
        return PybindProgram(source, threads=threads)
    raise BundleError(f"unknown runtime adapter '{adapter}'; available: {', '.join(have) or 'none'}")
