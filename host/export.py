"""Quantize (PT2E, XNNPACK quantizer) and export to an ExecuTorch program.

    from toma_edge.host.export import export_program
    res = export_program(model, example, max_batch=256, quantize="int8",
                         calibration=[X_train[i:i+32] for i in range(0, 256, 32)])
    open("model.pte", "wb").write(res.pte)
    res.reference(x)            # the eager model that model.pte computes (int8 simulated)

The program takes raw input rows with a dynamic batch dimension 1..max_batch;
preprocessing is whatever the model's forward does, so it travels inside the graph.

Where the graph does not allow a dynamic batch (recurrent layers: their initial state is
a constant of the example's batch; the lowered program only runs at that size), the
program is exported for a fixed batch instead (``res.fixed_batch``, at most
``fixed_batch`` rows, default 32): the runtime pads shorter batches and splits longer
ones, and the manifest says so (``export_batch``). Each lowered program is probed in the
runtime (its input bound, one row, an odd batch) before it is returned.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

# torchao warns at import about CUDA kernels a CPU build cannot load, and torch's pytree
# about a deprecation inside torchao: noise on a user's terminal, nothing they can act on
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__all__ = ["Quantization", "ExportResult", "export_program", "export_example", "example_rows",
           "WithSoftmax", "quantize_model", "export_net", "calibration_batches", "run_rows"]

Quantization = Literal["int8", "int8-dynamic", "fp32"]


class WithSoftmax(nn.Module):
    """A classifier's graph ends in softmax: the program outputs probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=-1)


def export_net(model: nn.Module, task: str) -> nn.Module:
    """What goes into the program: a classifier's logits end in softmax."""
    return WithSoftmax(model).eval() if task == "classification" else model.eval()


def calibration_batches(X: np.ndarray, batches: int, *, batch_size: int = 32, seed: int = 0
                        ) -> list[np.ndarray]:
    """``batches`` random batches of training rows for int8 calibration."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(X))
    end = min(len(X), batches * batch_size)
    return [X[idx[i : i + batch_size]] for i in range(0, end, batch_size)]


def run_rows(program: Any, X: np.ndarray, max_batch: int) -> np.ndarray:
    """Rows through a loaded program in batches of at most ``max_batch``."""
    return np.concatenate([program.run([np.ascontiguousarray(X[i : i + max_batch])])[0]
                           for i in range(0, len(X), max_batch)])


@dataclass
class ExportResult:
    pte: bytes
    planned_bytes: int
    reference: Callable[[torch.Tensor], torch.Tensor]
    quantization: Quantization
    #: the one batch size the program runs at, when the graph allowed no dynamic batch
    fixed_batch: int | None = None
    #: why the batch is fixed (the dynamic program's failure), for the build's log
    fixed_reason: str = ""
    #: the fp32 eager model the program was quantized from (for fp32, ``reference``)
    fp32_reference: Callable[[torch.Tensor], torch.Tensor] | None = None


#: the largest fixed batch a recurrent program is exported for: every run costs this many
#: rows, so a single-row request pays for all of them (lower export.max_batch to trade)
FIXED_BATCH_CAP = 32


def _dynamic_shapes(max_batch: int | None) -> dict[str, dict[int, object]] | None:
    from torch.export import Dim

    if max_batch is None:
        return None  # a fixed-batch export: the example's batch is the program's
    # min=1 would let export specialise a size-1 example; the example has >= 2 rows
    return {"x": {0: Dim("batch", min=1, max=max_batch)}}


class _Entry(nn.Module):
    """Names the program's input ``x`` whatever the user's forward calls it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def export_example(example: torch.Tensor, max_batch: int) -> torch.Tensor:
    """An example batch export can trace without specialising the batch dimension.

    A 2-row example let export guard conv models to batch <= 15 (the program then
    refused batch 16 and up); min(32, max_batch) rows avoids such guards.
    """
    want = max(2, min(32, max_batch))
    n = int(example.shape[0])
    if n >= want:
        return example[:want]
    reps = -(-want // max(1, n))
    return example.repeat(reps, *([1] * (example.ndim - 1)))[:want]


def quantize_model(
    model: nn.Module,
    example: torch.Tensor,
    *,
    kind: Quantization,
    max_batch: int,
    calibration: Iterable[np.ndarray],
    fixed_batch: int | None = None,
) -> nn.Module:
    """PT2E quantization with the XNNPACK quantizer (per-channel weights).

    ``int8``: static activations calibrated on ``calibration`` batches; ``int8-dynamic``:
    activation scales computed per batch at run time (outputs depend on batch mates).
    Returns the converted (eager, simulated-int8) module; ``fp32`` returns the model.
    """
    if kind == "fp32":
        return model
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class PostTrainingQuantizer(XNNPACKQuantizer):
        # the conv-BatchNorm patterns match training-mode batch norm, which an eval-mode
        # export never holds; matching them exported 12 pattern graphs per call (2.6 s of a
        # 3.2 s int8 quantization of an MLP, 80% of the example build's quantization time)
        SUPPORTED_PATTERNS = [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS if not p.is_qat]

    example = example_rows(example, max_batch, fixed_batch)
    qcfg = get_symmetric_quantization_config(is_per_channel=True,
                                             is_dynamic=(kind == "int8-dynamic"))
    quantizer = PostTrainingQuantizer().set_global(qcfg)
    captured = torch.export.export(
        _Entry(model).eval(), (example,),
        dynamic_shapes=_dynamic_shapes(None if fixed_batch else max_batch)
    ).module()
    prepared = prepare_pt2e(captured, quantizer)  # type: ignore[arg-type]
    with torch.no_grad():
        n = 0
        for batch in calibration:
            xb = torch.as_tensor(np.asarray(batch), dtype=torch.float32)
            if fixed_batch:
                prepared(example_rows(xb, fixed_batch, fixed_batch))
            else:  # the captured graph guards its batch to 1..max_batch
                for i in range(0, len(xb), max_batch):
                    prepared(xb[i : i + max_batch])
            n += 1
        if n == 0 and kind == "int8":
            raise ConfigError("int8 quantization needs calibration data; got no batches")
    return convert_pt2e(prepared)


def example_rows(example: torch.Tensor, max_batch: int, fixed_batch: int | None
                  ) -> torch.Tensor:
    """The export example (:func:`export_example`), or exactly ``fixed_batch`` rows (the
    rows repeated) for a fixed-batch export."""
    if not fixed_batch:
        return export_example(example, max_batch)
    n = int(example.shape[0])
    reps = -(-fixed_batch // max(1, n))
    return example.repeat(reps, *([1] * (example.ndim - 1)))[:fixed_batch]


def export_program(
    model: nn.Module,
    example: torch.Tensor,
    *,
    max_batch: int,
    quantize: Quantization = "int8",
    calibration: Iterable[np.ndarray] = (),
    fixed_batch: int | None = None,
) -> ExportResult:
    """Quantize as asked, export with a dynamic batch, lower to XNNPACK, serialise; a
    program that does not run at every batch size 1..max_batch is exported again for a
    fixed batch of ``min(max_batch, FIXED_BATCH_CAP)`` rows (``fixed_batch`` forces one)."""
    if quantize not in ("int8", "int8-dynamic", "fp32"):
        raise ConfigError(f"unknown quantization '{quantize}'; use int8, int8-dynamic or fp32")
    calibration = list(calibration)
    model = model.eval()
    why = "asked for" if fixed_batch else _recurrent_layers(model)
    if fixed_batch is None and not why:
        res = _lower(model, example, max_batch, quantize, calibration, None)
        why = _probe_dynamic(res.pte, example, max_batch)
        if not why:
            return res
    if fixed_batch is None:
        fixed_batch = min(max_batch, FIXED_BATCH_CAP)
    res = _lower(model, example, max_batch, quantize, calibration, fixed_batch)
    res.fixed_reason = why
    return res


def _lower(model: nn.Module, example: torch.Tensor, max_batch: int, quantize: Quantization,
           calibration: list[np.ndarray], fixed_batch: int | None) -> ExportResult:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = example_rows(example, max_batch, fixed_batch)
    ref = quantize_model(model, example, kind=quantize, max_batch=max_batch,
                         calibration=calibration, fixed_batch=fixed_batch)
    entry: nn.Module = ref if quantize != "fp32" else _Entry(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(entry, (example,),
                                 dynamic_shapes=_dynamic_shapes(None if fixed_batch else max_batch))
        pm = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    plan = pm.executorch_program.execution_plan[0]
    planned = int(sum(plan.non_const_buffer_sizes))

    def reference(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return entry(x)

    def fp32(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return ExportResult(pte=pm.buffer, planned_bytes=planned, reference=reference,
                        quantization=quantize, fixed_batch=fixed_batch, fp32_reference=fp32)


def _recurrent_layers(model: nn.Module) -> str:
    """Why ``model`` cannot have a dynamic batch ("" when it may): recurrent layers keep an
    initial state of the example's batch in the lowered graph (and lowering a dynamic
    attempt of an unrolled sequence costs a minute to learn that)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    if not names:
        return ""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return (f"recurrent layers ({', '.join(names[:3])}{more}) keep their initial state at "
            "the export batch")


def _probe_dynamic(pte: bytes, example: torch.Tensor, max_batch: int) -> str:
    """Why a dynamic-batch program does not run at every batch size ("" when it does):
    its input bound below ``max_batch``, or a failure at 1 row or an odd batch (the
    lowered graph kept a tensor of the example's batch)."""
    from ..device.adapter import load_program
    from .verify import runtime_log

    with runtime_log() as last_line:
        try:
            prog = load_program(pte, threads=1)
        except Exception as e:  # noqa: BLE001  (the verification names it again)
            return f"the program does not load ({e})"
        bound = int(prog.inputs[0].shape[0])
        if bound < max_batch:
            return f"the lowered program takes at most {bound} rows, not {max_batch}"
        row = example[:1].numpy()
        for b in sorted({1, min(max_batch, 3)}):
            try:
                prog.run([np.ascontiguousarray(np.repeat(row, b, axis=0))])
            except Exception as e:  # noqa: BLE001
                native = last_line()
                return f"the dynamic-batch program fails at batch {b} ({native or e})"
    return ""
