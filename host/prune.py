"""Structured pruning: remove whole Linear neurons and Conv2d channels, then fine-tune.

    from toma_edge.host.prune import prune_structured, finetune
    from toma_edge.host.example import ExampleRegressor
    small = prune_structured(ExampleRegressor(), 0.5)      # 20-64-32-1 -> 20-32-16-1
    small = finetune(small, X_train, y_train, spec, epochs=20)
    sum(p.numel() for p in small.parameters())              # about a third of the original

The model is traced with ``torch.fx``; a Linear or Conv2d (groups 1) is a *producer* when
its output reaches exactly one Linear or Conv2d (the *consumer*) through element-wise
layers (ReLU and other activations, Dropout, pooling, BatchNorm, Flatten). Pruning a
producer's unit removes its row (filter), its bias, the matching BatchNorm entries and the
consumer's input column (for Flatten -> Linear, the ``H*W`` columns of that channel). The
last layer (the model's output) is never pruned, so inputs and outputs keep their shapes
and the exported program is genuinely smaller and faster.

Importance of unit ``j`` (the stated criterion): ``||in_j||_p * ||out_j||_p`` with ``p = 2``
(``criterion="l2"``, default) or ``p = 1`` (``"l1"``); ``in_j`` is the producer's weights
and bias of that unit, replaced by the BatchNorm scale ``|gamma_j| / sqrt(var_j + eps)`` and
shift when BatchNorm follows (BatchNorm cancels the filter's own scale), and ``out_j`` is
the consumer's weights that read the unit (its outgoing weights). With ReLU, scaling a
unit's incoming weights by ``a`` and outgoing by ``1/a`` changes nothing; the product does
not change either, unlike either norm alone. The lowest-ranked units of every producer
are removed, the same ``ratio`` per layer, keeping at least one.

``prune_magnitude`` (unstructured) only zeroes single weights: the tensors keep their
shapes, so with dense kernels (XNNPACK, and the .pte file) it saves no memory, no storage
and no time. It is here for experiments; build never uses it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import torch
from torch import fx, nn

from ..errors import ConfigError
from .train import TrainSpec, train_model

__all__ = [
    "Criterion",
    "PrunePair",
    "find_prunable",
    "unit_scores",
    "prune_structured",
    "finetune",
    "prune_magnitude",
]

Criterion = Literal["l2", "l1"]

# element-wise along the unit/channel axis: a pruned unit's output simply disappears
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Hardtanh,
    nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.sigmoid, torch.tanh,
                   torch.nn.functional.gelu, torch.nn.functional.max_pool2d,
                   torch.nn.functional.avg_pool2d, torch.nn.functional.dropout}
_PASS_METHODS = {"relu", "sigmoid", "tanh"}
_FLATTEN_FUNCTIONS = {torch.flatten}


@dataclass(frozen=True)
class PrunePair:
    """A producer whose units can be removed, and what depends on them.

    ``flatten_spatial`` is ``H*W`` when a Flatten sits between a Conv2d producer and a
    Linear consumer (each channel feeds that many consecutive input columns), else 1.
    """

    producer: str
    consumer: str
    batchnorm: str | None
    flatten_spatial: int = 1


def _is_prunable_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def find_prunable(model: nn.Module) -> list[PrunePair]:
    """The producer -> consumer pairs of ``model`` that structured pruning can shrink."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many kinds on data-dependent Python control flow
        raise ConfigError(
            f"structured pruning needs a model torch.fx can trace; {type(model).__name__} "
            f"cannot be traced ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "use compress.prune: 0"
        ) from e
    mods = dict(model.named_modules())
    pairs: list[PrunePair] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_prunable_layer(mods[node.target]):
            continue
        producer = mods[node.target]
        n_units = (producer.out_features if isinstance(producer, nn.Linear)
                   else producer.out_channels)
        bn: str | None = None
        flattened = False
        cur = node
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break  # feeds two places (or the output): its units are not free to go
            u = users[0]
            if u.op == "call_module":
                m = mods[u.target]
                if _is_prunable_layer(m):
                    in_units = m.in_features if isinstance(m, nn.Linear) else m.in_channels
                    spatial = 1
                    if flattened and isinstance(m, nn.Linear):
                        if in_units % n_units:
                            break
                        spatial = in_units // n_units
                    elif in_units != n_units:
                        break
                    if isinstance(m, nn.Conv2d) and flattened:
                        break
                    pairs.append(PrunePair(str(node.target), str(u.target), bn, spatial))
                    break
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and bn is None and not flattened:
                    if m.num_features != n_units:
                        break
                    bn = str(u.target)
                elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                    flattened = True
                elif not isinstance(m, _PASS_MODULES):
                    break
            elif u.op == "call_function" and u.target in _PASS_FUNCTIONS and u.args[0] is cur:
                pass
            elif u.op == "call_function" and u.target in _FLATTEN_FUNCTIONS and u.args[0] is cur \
                    and (len(u.args) < 2 or u.args[1] == 1) and len(u.args) < 3 and not u.kwargs:
                flattened = True
            elif u.op == "call_method" and u.target in _PASS_METHODS:
                pass
            else:
                break
            cur = u
    return pairs


def _norm(t: torch.Tensor, p: int) -> torch.Tensor:
    return t.abs().sum(dim=1) if p == 1 else t.pow(2).sum(dim=1).sqrt()


@torch.no_grad()
def unit_scores(model: nn.Module, pair: PrunePair, *, criterion: Criterion = "l2") -> torch.Tensor:
    """Importance of each unit of ``pair.producer`` (see the module docstring), shape (units,)."""
    if criterion not in ("l1", "l2"):
        raise ConfigError(f"unknown pruning criterion '{criterion}'; use l2 or l1")
    p = 1 if criterion == "l1" else 2
    mods = dict(model.named_modules())
    prod, cons = mods[pair.producer], mods[pair.consumer]
    n = prod.weight.shape[0]
    if pair.batchnorm is not None:
        bn = cast(nn.BatchNorm2d, mods[pair.batchnorm])
        var = bn.running_var if bn.running_var is not None else torch.ones(n)
        scale = (bn.weight if bn.affine else torch.ones(n)) / torch.sqrt(var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros(n)
        incoming = torch.stack([scale, shift], dim=1)
    else:
        incoming = prod.weight.reshape(n, -1)
        if prod.bias is not None:
            incoming = torch.cat([incoming, prod.bias.reshape(n, 1)], dim=1)
    w = cons.weight  # Linear (out, in); Conv2d (out, in, kh, kw)
    outgoing = w.transpose(0, 1).reshape(n, -1) if isinstance(cons, nn.Conv2d) else \
        w.reshape(w.shape[0], n, pair.flatten_spatial).permute(1, 0, 2).reshape(n, -1)
    return _norm(incoming, p) * _norm(outgoing, p)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _shrunk(m: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> nn.Module:
    layer = cast(nn.Linear | nn.Conv2d, m)
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if out_keep is not None:
        w = w[out_keep]
        b = b[out_keep] if b is not None else None
    if in_keep is not None:
        w = w[:, in_keep]
    new: nn.Module
    if isinstance(m, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        assert isinstance(m, nn.Conv2d)
        new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, stride=m.stride,  # type: ignore[arg-type]
                        padding=m.padding, dilation=m.dilation, bias=b is not None,  # type: ignore[arg-type]
                        padding_mode=m.padding_mode)
    new.weight = nn.Parameter(w.clone())
    if b is not None:
        new.bias = nn.Parameter(b.clone())
    return new.to(layer.weight.dtype)


def _shrunk_bn(bn: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = cast(nn.BatchNorm2d, copy.deepcopy(bn))
    new.num_features = int(keep.numel())
    for name in ("weight", "bias"):
        t = getattr(bn, name)
        if t is not None:
            setattr(new, name, nn.Parameter(t.detach()[keep].clone()))
    for name in ("running_mean", "running_var"):
        t = getattr(bn, name)
        if t is not None:
            setattr(new, name, t[keep].clone())
    return new


@torch.no_grad()
def prune_structured(model: nn.Module, ratio: float, *, criterion: Criterion = "l2") -> nn.Module:
    """A copy of ``model`` with ``ratio`` of every prunable layer's units removed.

    ``ratio`` is a fraction in [0, 1): 0.5 removes half the hidden neurons (channels) of
    each producer, rounding to the nearest unit and keeping at least one. The copy is in
    eval mode; fine-tune it (``finetune``) to recover accuracy. Raises ConfigError when
    the model has nothing to prune and ``ratio > 0``.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"pruning ratio must be a fraction in [0, 1), got {ratio}")
    model = copy.deepcopy(model).eval()
    if ratio == 0.0:
        return model
    pairs = find_prunable(model)
    if not pairs:
        raise ConfigError(
            f"{type(model).__name__} has no hidden Linear/Conv2d layer feeding another one "
            "through element-wise layers, so nothing can be pruned; use compress.prune: 0"
        )
    mods = dict(model.named_modules())
    out_keep: dict[str, torch.Tensor] = {}
    in_keep: dict[str, torch.Tensor] = {}
    bn_keep: dict[str, torch.Tensor] = {}
    for pair in pairs:
        scores = unit_scores(model, pair, criterion=criterion)
        n = scores.numel()
        k = max(1, int(round(n * (1.0 - ratio))))
        keep = torch.sort(torch.topk(scores, k).indices).values
        out_keep[pair.producer] = keep
        if pair.batchnorm is not None:
            bn_keep[pair.batchnorm] = keep
        s = pair.flatten_spatial
        in_keep[pair.consumer] = (keep[:, None] * s + torch.arange(s)[None, :]).reshape(-1)
    for name in sorted(set(out_keep) | set(in_keep)):
        _set_module(model, name, _shrunk(mods[name], out_keep.get(name), in_keep.get(name)))
    for name, keep in bn_keep.items():
        _set_module(model, name, _shrunk_bn(mods[name], keep))
    return model.eval()


def finetune(
    model: nn.Module, X: np.ndarray, y: np.ndarray, spec: TrainSpec, *,
    epochs: int, lr_scale: float = 0.5,
) -> nn.Module:
    """Train a pruned model a few more ``epochs`` (Adam, ``lr_scale`` x the spec's rate),
    in place."""
    if epochs <= 0:
        return model.eval()
    tuned = TrainSpec(task=spec.task, epochs=epochs, lr=spec.lr * lr_scale,
                      batch_size=spec.batch_size, seed=spec.seed, weight_decay=spec.weight_decay)
    return train_model(model, X, y, tuned)


@torch.no_grad()
def prune_magnitude(model: nn.Module, ratio: float) -> nn.Module:
    """A copy with the smallest ``ratio`` of each Linear/Conv2d weight set to zero (unstructured).

    Warning: this changes no shape. Dense kernels (XNNPACK, the .pte format) store and
    multiply the zeros like any other value, so the exported model is exactly as large,
    as memory-hungry and as slow as before. Use ``prune_structured`` to shrink a model.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"pruning ratio must be a fraction in [0, 1), got {ratio}")
    warnings.warn("unstructured pruning zeroes weights but saves no memory, storage or time "
                  "with dense kernels; use prune_structured to shrink the model", stacklevel=2)
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight
            k = int(round(w.numel() * ratio))
            if k:
                thresh = w.abs().reshape(-1).kthvalue(k).values
                w.mul_((w.abs() > thresh).to(w.dtype))
    return model
