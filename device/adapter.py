"""Load an ExecuTorch program and run a method: the device's one seam to the runtime.

    from toma_edge.device.adapter import load_program
    prog = load_program("dist/rpi4/model.pte", threads=4)
    (y,) = prog.run([np.random.rand(8, 10).astype(np.float32)])
    out = np.empty((100, 1), np.float32)
    prog.run_batches_into(np.random.rand(100, 10).astype(np.float32), out, 32)  # 4 calls
    prog.adapter, prog.inputs[0].shape                 # "native" (or "pybind"), (max_batch, 10)
    prog.close()

Everything around it (Predictor, loaders, service, agent) speaks numpy arrays and sees a
:class:`Program` (the protocol below: the only methods the rest of the package calls). Two
adapters implement it, chosen automatically, best first:

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
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BundleError, InputError

__all__ = ["Program", "TensorInfo", "load_program", "available_adapters",
           "native_executorch_version", "release_native_programs", "native_log",
           "pad_batch"]

# ExecuTorch's ScalarType codes (c10 numbering), as the pybindings' TensorInfo.dtype() gives them
_SCALAR_TYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 5: np.float16,
                 6: np.float32, 7: np.float64, 11: np.bool_}


@dataclass(frozen=True)
class TensorInfo:
    """A method input or output as the program plans it (shape at the maximum batch)."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int


class Program(Protocol):
    """A loaded program's ``forward`` method: everything the device calls on a runtime.

    ``adapter``: ``"native"`` or ``"pybind"``; ``inputs``/``outputs``: the method's tensors
    as planned (shape at ``max_batch``). A program may be shared by threads: calls run one
    at a time (an ExecuTorch method is not reentrant). Runtime failures are InputError;
    a closed program answers BundleError.
    """

    adapter: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The outputs for these inputs (new arrays, one per output)."""
        ...

    def run_batches_into(self, x: np.ndarray, out: np.ndarray, size: int) -> None:
        """Run a one-input, one-output method over C-contiguous ``x`` in consecutive
        batches of ``size`` rows, each result into the matching rows of ``out``."""
        ...

    def close(self) -> None:
        """Free the program now (idempotent); later calls raise BundleError."""
        ...

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        ...


def pad_batch(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` padded to ``rows`` rows with copies of its last row, for a program exported
    at a fixed batch (the padding's outputs are dropped by the caller); ``x`` itself when
    it has that many rows already."""
    if len(x) >= rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


@contextlib.contextmanager
def native_log() -> Iterator[Callable[[], str]]:
    """Capture what native code (ExecuTorch's log lines) writes to fd 2 while inside;
    yields a function returning the text captured so far ("" when fd 2 cannot be
    redirected). fd 2 is the process's: meant for a single-threaded caller."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:
        yield lambda: ""
        return
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            def text() -> str:
                f.flush()
                f.seek(0)
                return f.read().decode("utf-8", "replace")

            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _quiet_native() -> Iterator[None]:
    """Silence ExecuTorch's native log lines (cpuinfo, threadpool) on fd 2 while loading,
    so a CLI error stays one line; TOMA_EDGE_NATIVE_LOGS=1 keeps them."""
    if os.environ.get("TOMA_EDGE_NATIVE_LOGS") == "1":
        yield
        return
    with native_log():
        yield


_threads_lock = threading.Lock()
_threads_set: int | None = None


def _size_threadpool(threads: int | None, reset: Any) -> None:
    """Size XNNPACK's one process-wide pool (both adapters share its library) before a
    method is loaded; only when asked and different. Call with ``_threads_lock`` held."""
    global _threads_set
    if threads and threads != _threads_set:
        reset(int(threads))
        _threads_set = int(threads)


def _pybind_info(meta: Any) -> TensorInfo:
    """A pybindings ``TensorInfo`` through its accessors (``sizes()``, ``dtype()``,
    ``nbytes()``)."""
    code = int(meta.dtype())
    if code not in _SCALAR_TYPES:
        raise BundleError(f"the program has a tensor of ExecuTorch scalar type {code}, "
                          "which toma-edge does not run")
    return TensorInfo(shape=tuple(int(v) for v in meta.sizes()),
                      dtype=np.dtype(_SCALAR_TYPES[code]).name, nbytes=int(meta.nbytes()))


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
        self.inputs = tuple(_pybind_info(meta.input_tensor_meta(i))
                            for i in range(meta.num_inputs()))
        self.outputs = tuple(_pybind_info(meta.output_tensor_meta(i))
                             for i in range(meta.num_outputs()))
        self._torch = torch
        self._lock = threading.Lock()  # an ExecuTorch method is not reentrant

    def close(self) -> None:
        """Drop the module (idempotent); later calls raise BundleError."""
        with self._lock:
            self._module = None

    @property
    def closed(self) -> bool:
        return self._module is None

    def _forward(self) -> Any:
        module = self._module
        if module is None:
            raise BundleError("the model was released; load the bundle again")
        return module.forward

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        ts = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        with self._lock:
            fwd = self._forward()
            try:
                outs = fwd(ts, False)
            except RuntimeError as e:
                raise InputError(f"ExecuTorch method failed: {e}") from e
            # copy out: with clone_outputs=False the outputs alias the program's planned
            # memory, which the next call overwrites (one copy instead of two)
            return [o.numpy().copy() for o in outs]

    def run_batches_into(self, x: np.ndarray, out: np.ndarray, size: int) -> None:
        """Run ``x`` in consecutive batches of ``size`` rows (one-input, one-output),
        each result into the matching rows of ``out``; the lock is taken once.

        The Predictor's hot loop: per batch only the method call and one copy remain. The
        input batches are cut in one C call (``Tensor.split``, views, no copy), and the
        method returns its output uncloned (``clone_outputs=False``: a view of the
        program's planned memory), copied once into ``out`` before the next call reuses
        it; at batch 32 this is ~10% of the per-batch time.
        """
        with self._lock:
            fwd = self._forward()
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
) -> Program:
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
    raise BundleError(f"unknown runtime adapter '{adapter}'; "
                      f"available: {', '.join(have) or 'none'}")
