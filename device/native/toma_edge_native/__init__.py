"""ExecuTorch programs on numpy arrays, with no torch: toma-edge's native device adapter.

    from toma_edge_native import Program
    prog = Program("model.pte")
    prog.inputs[0].shape, prog.inputs[0].dtype      # planned at the maximum batch
    (y,) = prog.run([x])                             # numpy in, numpy out

The ExecuTorch runtime libraries (runtime, optimized kernels, XNNPACK delegate, thread
pool) ship beside the compiled module and are found through RPATH ``$ORIGIN``.
"""

from __future__ import annotations


class ExecuTorchError(RuntimeError):
    """An ExecuTorch error code: ``name`` (e.g. ``OperatorMissing``) and ``code``."""

    def __init__(self, message: str, code: int = 0, name: str = "Internal") -> None:
        super().__init__(message)
        self.code = code
        self.name = name


from ._et import EXECUTORCH_VERSION, Program, Spec, set_threads, threads  # noqa: E402

__all__ = ["ExecuTorchError", "EXECUTORCH_VERSION", "Program", "Spec", "set_threads", "threads"]
