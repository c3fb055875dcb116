"""Structured pruning through the dependency graph: remove whole channels, then fine-tune.

    import torch
    from toma_edge.host.prune import prune_structured, pruning_plan, finetune
    from toma_edge.host.example import ExampleRegressor
    x = torch.rand(2, 10)                                   # a batch the model runs on
    print(pruning_plan(ExampleRegressor(), x).describe())   # groups, and what is left alone
    small = prune_structured(ExampleRegressor(), 0.5, example_inputs=x)  # 20-32-16-1
    small = finetune(small, X_train, y_train, spec, epochs=20)
    sum(p.numel() for p in small.parameters())              # about a third of the original

The model runs once on ``example_inputs`` and torch-pruning's DepGraph (``torch_pruning``,
1.6) builds the dependency graph of that forward pass. A *group* is a set of channels that
must go together: both sides of a residual add (a ResNet stage's stem, downsample and every
block's last conv), a depthwise convolution and the layer feeding it, a squeeze-excitation
gate and the channels it scales, the input columns of every consumer (after a Flatten, the
``H*W`` columns of each channel; after torch.cat, the columns at that branch's offset),
BatchNorm/LayerNorm entries, biases. Every Linear and Conv (1-3 d) is the root of a group
unless an earlier group already holds it.

Left alone, and named with the reason by ``pruning_plan`` (``PrunePlan.left_alone``):
groups that reach the model's output (the classifier/regressor layer's outputs; input and
output shapes never change), recurrent layers (GRU/LSTM/RNN hidden sizes and gates),
nn.MultiheadAttention (embedding size and heads; in a transformer the residual stream
that runs through it stays, its feed-forward hidden layer is pruned), grouped (not
depthwise) convolutions, bare nn.Parameters, and any group whose pruning makes the forward
pass fail or change an output shape (each group is checked by a forward pass after it is
pruned; the pass restarts without it). Weight norm is folded into plain weights in the
pruned copy (the same function). ``prune_structured`` never changes its input.

Without ``example_inputs`` the input shape is guessed from the first layer (Linear:
``(2, in)`` or ``(2, 8, in)``; Conv: a few square sizes; GRU/LSTM: ``(2, 8, F)``); when no
guess runs (a model that reshapes raw rows inside, like the digits CNN example's 64-pixel
rows), only simple chains are found with torch.fx (a Linear or Conv2d feeding exactly
one Linear or Conv2d through element-wise layers), ``PrunePlan.method == "chains"``.

Importance of unit ``j`` (the stated criterion): ``||in_j||_p * ||out_j||_p`` with ``p = 2``
(``criterion="l2"``, default) or ``p = 1`` (``"l1"``); ``in_j`` is every producer's weights
and bias of that unit (depthwise kernels too), replaced by the BatchNorm scale
``|gamma_j| / sqrt(var_j + eps)`` and shift where BatchNorm follows (BatchNorm cancels the
filter's own scale), and ``out_j`` is every consumer's weights that read the unit (its
outgoing weights). With ReLU, scaling a unit's incoming weights by ``a`` and outgoing by
``1/a`` changes nothing; the product does not change either, unlike either norm alone.
All groups are ranked on the unpruned model; the lowest-ranked units of every group are
removed, the same ``ratio`` per group (rounded, at least one unit kept).

``prune_magnitude`` (unstructured) only zeroes single weights: the tensors keep their
shapes, so with dense kernels (XNNPACK, and the .pte file) it saves no memory, no storage
and no time. It is here for experiments; build never uses it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import fx, nn

from ..errors import ConfigError
from .train import TrainSpec, train_model

__all__ = [
    "Criterion",
    "Example",
    "PrunePair",
    "PrunePlan",
    "find_prunable",
    "pruning_plan",
    "unit_scores",
    "prune_structured",
    "finetune",
    "prune_magnitude",
    "fold_reparametrizations",
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


Example = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class PrunePlan:
    """What structured pruning changes in a model, and what it leaves alone and why.

    ``prunable``: the Linear/Conv layers whose output units (channels) get removed.
    ``groups``: the coupled sets among them (layers whose channels go together: both sides
    of a residual add, a depthwise convolution and its input, an SE block's gate). Each
    group is pruned by the same ratio, its channels ranked together. ``left_alone``:
    (layer name, reason) for every layer whose units are kept. ``method`` is
    ``"dependency graph"`` (torch-pruning's DepGraph over a traced forward pass) or
    ``"chains"`` (no example input could be found: only simple chains, via torch.fx).
    Truthy exactly when something can be pruned.
    """

    prunable: list[str]
    left_alone: list[tuple[str, str]]
    groups: list[list[str]] = field(default_factory=list)
    method: str = "dependency graph"

    def __bool__(self) -> bool:
        return bool(self.prunable)

    def describe(self) -> str:
        """Human-readable lines, one per group and one per layer left alone."""
        lines = [f"structured pruning ({self.method}): {len(self.groups)} group(s)"]
        lines += [f"  prune together: {', '.join(g)}" for g in self.groups]
        lines += [f"  left alone: {name}: {why}" for name, why in self.left_alone]
        return "\n".join(lines)


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError as e:  # pragma: no cover - a host install has it
        raise ConfigError(
            "structured pruning needs torch-pruning (pip install 'torch-pruning==1.6.1', "
            "part of toma-edge[host])") from e
    return torch_pruning


# layers whose inner sizes torch-pruning cannot change safely for us: hidden sizes of
# recurrent layers (gate blocks, the hidden state the runtime carries), attention heads
_LEFT_ALONE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.RNNBase, "recurrent layer: its hidden size and gates are kept"),
    (nn.MultiheadAttention, "attention: its embedding size and heads are kept"),
)


def _left_alone_pruner() -> Any:
    """A torch-pruning pruner for layers we never change; it only marks them in the graph."""
    tp = _tp()

    class _LeftAlone(tp.pruner.function.BasePruningFunc):  # type: ignore[misc, name-defined]
        TARGET_MODULES = None

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            raise ConfigError(f"internal: {type(layer).__name__} is left alone")

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            raise ConfigError(f"internal: {type(layer).__name__} is left alone")

        def get_out_channels(self, layer: nn.Module) -> None:
            return None

        def get_in_channels(self, layer: nn.Module) -> None:
            return None

    return _LeftAlone()


def _as_tuple(example: Example) -> tuple[torch.Tensor, ...]:
    return example if isinstance(example, tuple) else (example,)


def _first_layer_guesses(model: nn.Module) -> list[tuple[torch.Tensor, ...]]:
    """Example inputs to try when none is given, from the model's first weighted layer."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return [(torch.rand(2, m.in_features),), (torch.rand(2, 8, m.in_features),)]
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            nd = len(m.kernel_size)
            sizes = (32, 28, 64, 16, 50, 100, 128, 224, 8, 96, 200, 256)
            guesses: list[tuple[torch.Tensor, ...]] = [
                (torch.rand(2, m.in_channels, *([s] * nd)),) for s in sizes]
            if nd == 1:  # sequence models often take (N, T, F) and transpose inside
                guesses += [(torch.rand(2, s, m.in_channels),) for s in sizes]
            return guesses
        if isinstance(m, nn.RNNBase):
            shape = (2, 8, m.input_size) if m.batch_first else (8, 2, m.input_size)
            return [(torch.rand(*shape),)]
        if isinstance(m, nn.Embedding):
            return [(torch.zeros(2, 8, dtype=torch.long),)]
    return []


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    return []


@torch.no_grad()
def _find_example(model: nn.Module, given: Example | None) -> tuple[torch.Tensor, ...] | None:
    """``given`` checked by one forward pass, else the first guess that runs, else None."""
    if given is not None:
        ex = _as_tuple(given)
        try:
            model(*ex)
        except Exception as e:
            raise ConfigError(
                f"structured pruning: {type(model).__name__} does not run on the example input "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        return ex
    for ex in _first_layer_guesses(model):
        try:
            model(*ex)
        except Exception:  # a wrong guess of the input shape: try the next one
            continue
        return ex
    return None


def _kind(module: nn.Module) -> str | None:
    for cls, why in _LEFT_ALONE_KINDS:
        if isinstance(module, cls):
            return why
    return None


class _Graph:
    """torch-pruning's DepGraph of a working copy, with our rules on which groups may go."""

    def __init__(self, model: nn.Module, example: tuple[torch.Tensor, ...],
                 skip: set[str]) -> None:
        tp = _tp()
        self.tp = tp
        self.model = model
        self.example = example
        self.names = {m: n for n, m in model.named_modules()}
        self.skip = skip
        self.order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        frozen = _left_alone_pruner()
        kinds = {type(m) for m in model.modules() if _kind(m) is not None}
        self.frozen = {m for m in model.modules() if _kind(m) is not None}
        hooks = [m.register_forward_hook(_opaque) for m in self.frozen]
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example, forward_fn=lambda m, xs: m(*xs),
                    customized_pruners={k: frozen for k in kinds}, verbose=False)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            self.shapes = [tuple(t.shape) for t in _outputs(model(*example))]

    def name(self, module: Any) -> str:
        return self.names.get(module, "") if isinstance(module, nn.Module) else ""

    def refusal(self, group: Any) -> str | None:
        """Why ``group`` may not be pruned, or None."""
        ops = self.tp.ops
        for item in group:
            node = item.dep.target
            m = node.module
            changes_out = self.dg.is_out_channel_pruning_fn(item.dep.handler)
            if node.type == ops.OPTYPE.OUTPUT or (changes_out and not node.outputs):
                return "its channels are the model's output (shape kept)"
            if node.type == ops.OPTYPE.PARAMETER:
                return "coupled with a bare nn.Parameter, whose layout is unknown"
            if m in self.frozen:
                return f"coupled with {type(m).__name__} '{self.name(m)}', which is left alone"
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not (
                    m.groups == m.in_channels == m.out_channels):
                return f"coupled with the grouped convolution '{self.name(m)}' (groups={m.groups})"
            if self.name(m) in self.skip and changes_out:
                return "pruning it broke the forward pass or a coupled layer, so it is kept"
        return None

    def out_layers(self, group: Any) -> list[str]:
        """The Linear/Conv layers whose output units ``group`` removes, in group order."""
        names: list[str] = []
        for item in group:
            m = item.dep.target.module
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and \
                    self.dg.is_out_channel_pruning_fn(item.dep.handler):
                n = self.name(m)
                if n and n not in names:
                    names.append(n)
        return sorted(names, key=lambda s: self.order.get(s, 0))

    def groups(self) -> Iterator[tuple[str, Any]]:
        """(root layer, its full group) for each Linear/Conv whose outputs no earlier group
        covers; the group is None (with the reason instead) where torch-pruning cannot
        follow the channels. The same walk as ``DependencyGraph.get_all_groups``, one
        root at a time so one failure names its layer instead of ending the walk."""
        dg, visited = self.dg, set()
        for m in list(dg.module2node):
            if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or m in visited:
                continue
            pruner = dg.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                group = dg.get_pruning_group(m, pruner.prune_out_channels,
                                             list(range(pruner.get_out_channels(m))))
            except Exception as e:  # a torch-pruning limit on this layer's coupling
                yield self.name(m), f"torch-pruning cannot follow its channels ({type(e).__name__})"
                continue
            for item in group:
                if dg.is_out_channel_pruning_fn(item.dep.handler):
                    visited.add(item.dep.target.module)
            yield self.name(m), group

    @torch.no_grad()
    def still_runs(self) -> str | None:
        """None when the model runs on the example with its output shapes, else the problem."""
        try:
            shapes = [tuple(t.shape) for t in _outputs(self.model(*self.example))]
        except Exception as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None if shapes == self.shapes else f"output shapes {shapes} != {self.shapes}"


def fold_reparametrizations(model: nn.Module) -> nn.Module:
    """Weight norm (the old hook or torch.nn.utils.parametrizations) folded into plain
    weights, in place: the same function, and weights torch-pruning can slice."""
    from torch.nn.utils import parametrize

    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            # by hand: remove_parametrizations edits the injected class, which a deepcopy
            # shares with the caller's model (it would break the original)
            names = list(cast(nn.ModuleDict, m.parametrizations).keys())
            values = {n: getattr(m, n).detach().clone() for n in names}
            del m._modules["parametrizations"]
            m.__class__ = m.__class__.__bases__[0]
            for n, v in values.items():
                m.register_parameter(n, nn.Parameter(v))
        for hook in list(getattr(m, "_forward_pre_hooks", {}).values()):
            if type(hook).__name__ == "WeightNorm":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.nn.utils.remove_weight_norm(m, getattr(hook, "name", "weight"))
    return model


def _opaque(module: nn.Module, inputs: Any, output: Any) -> Any:
    """While tracing, a left-alone layer's outputs hang on its inputs by one step: the graph
    sees the layer, not its inner gates and splits (which torch-pruning cannot map)."""
    anchor: torch.Tensor | None = None
    for t in _outputs(list(inputs)):
        if t.is_floating_point() and t.requires_grad:
            anchor = t.sum() * 0 if anchor is None else anchor + t.sum() * 0
    if anchor is None:
        return None
    outs = output if isinstance(output, tuple) else (output,)
    first = outs[0].detach() + anchor if isinstance(outs[0], torch.Tensor) else outs[0]
    tie = first.sum() * 0 if isinstance(first, torch.Tensor) else anchor
    rest = [o.detach() + tie if isinstance(o, torch.Tensor) else o for o in outs[1:]]
    return (first, *rest) if isinstance(output, tuple) else first


def _bn_follows(node: Any) -> bool:
    return any(isinstance(o.module, nn.modules.batchnorm._BatchNorm) for o in node.outputs)


@torch.no_grad()
def _group_scores(graph: _Graph, group: Any, n: int, p: int) -> torch.Tensor:
    """The stated criterion over a coupled group, shape (n,) for the root's n channels.

    Incoming: every producer's rows (weights and bias) of channel j, the BatchNorm scale and
    shift instead where a BatchNorm follows the producer, depthwise kernels; outgoing: every
    consumer's input columns reading channel j (all H*W columns after a Flatten).
    """
    inc = torch.zeros(n, dtype=torch.float64)
    out = torch.zeros(n, dtype=torch.float64)
    dw = type(graph.tp.pruner.function.PrunerBox[graph.tp.ops.OPTYPE.DEPTHWISE_CONV])
    has_in = has_out = False

    def power(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(torch.float64).reshape(t.shape[0], -1)
        return t.abs().sum(dim=1) if p == 1 else t.pow(2).sum(dim=1)

    for item in group:
        dep, idxs, root = item.dep, list(item.idxs), item.root_idxs
        if not idxs:
            continue
        m, h = dep.target.module, dep.handler
        ridx = torch.as_tensor(root, dtype=torch.long)
        pos = torch.as_tensor(idxs, dtype=torch.long)
        hname = getattr(h, "__name__", "")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            var = m.running_var if m.running_var is not None else torch.ones(c)
            scale = (m.weight if m.affine else torch.ones(c)) / torch.sqrt(var + m.eps)
            shift = m.bias if m.affine else torch.zeros(c)
            inc.index_add_(0, ridx, power(torch.stack([scale, shift], dim=1)[pos]))
            has_in = True
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            w = m.weight
            transposed = isinstance(m, nn.modules.conv._ConvNd) and m.transposed
            rows = w.transpose(0, 1) if transposed else w  # (out, in, ...)
            if isinstance(getattr(h, "__self__", None), dw) or hname == "prune_out_channels":
                if _bn_follows(dep.target):
                    continue  # the BatchNorm's scale and shift stand for this channel
                r = rows[pos].reshape(len(idxs), -1)
                if m.bias is not None:
                    r = torch.cat([r, m.bias[pos].reshape(-1, 1)], dim=1)
                inc.index_add_(0, ridx, power(r))
                has_in = True
            elif hname == "prune_in_channels":
                out.index_add_(0, ridx, power(rows.transpose(0, 1)[pos]))
                has_out = True
    root_p = 1.0 / p
    if has_in and has_out:
        return (inc.pow(root_p) * out.pow(root_p)).float()
    return (inc if has_in else out).pow(root_p).float()


def _run_graph(model: nn.Module, example: tuple[torch.Tensor, ...], ratio: float | None,
               p: int) -> tuple[nn.Module, PrunePlan, list[PrunePair]]:
    """Prune every allowed group of a copy of ``model`` (``ratio=None``: one unit each, to
    find which groups can go). A group whose pruning breaks the forward pass or changes an
    output shape is excluded and the whole pass restarts on a fresh copy."""
    skip: set[str] = set()
    while True:
        work = fold_reparametrizations(copy.deepcopy(model).eval())
        graph = _Graph(work, example, skip)
        left: dict[str, str] = {}
        groups: list[list[str]] = []
        pairs: list[PrunePair] = []
        broken: str | None = None
        # every group is ranked on the unpruned model first (the criterion reads each
        # layer's original weights), then the groups are pruned one by one
        todo: list[tuple[Any, Any, list[int], list[str]]] = []
        for root_name, group in graph.groups():
            if isinstance(group, str):
                left.setdefault(root_name, group)
                continue
            outs = graph.out_layers(group)
            why = graph.refusal(group)
            root_item = group[0]
            n = len(root_item.idxs)
            if why is None and n < 2:
                why = "a single unit: nothing to remove"
            if why is not None:
                for name in outs:
                    left.setdefault(name, why)
                continue
            keep = n - 1 if ratio is None else max(1, int(round(n * (1.0 - ratio))))
            drop: list[int] = []
            if keep < n:
                kept = set(torch.topk(_group_scores(graph, group, n, p), keep).indices.tolist())
                drop = [i for i in range(n) if i not in kept]
            pairs.append(_summary_pair(graph, group, n, outs[0]))
            groups.append(outs)
            todo.append((root_item.dep.target.module, root_item.dep.handler, drop, outs))
        for module, handler, drop, outs in todo:
            if not drop:
                continue
            pg = graph.dg.get_pruning_group(module, handler, drop)
            if not graph.dg.check_pruning_group(pg):
                broken = f"{outs[0]}: it would leave a coupled layer without units"
            else:
                try:
                    pg.prune()
                except Exception as e:  # a layer torch-pruning's handler cannot change
                    problem: str | None = f"{type(e).__name__}: {e}"
                else:
                    problem = graph.still_runs()
                broken = None if problem is None else f"{outs[0]}: {problem}"
            if broken is not None:
                skip.update(outs)
                break
        if broken is not None:
            if len(skip) > 256:
                raise ConfigError(f"structured pruning keeps breaking {type(model).__name__}'s "
                                  f"forward pass (last: {broken}); use compress.prune: 0")
            continue
        traced = {graph.name(m) for m in graph.dg.module2node}
        for name, m in work.named_modules():
            why = _kind(m)
            if why is not None:
                left.setdefault(name, why)
            elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and name not in left \
                    and not any(name in g for g in groups):
                inside = next((f for f in graph.frozen if name.startswith(graph.name(f) + ".")),
                              None)
                left[name] = (f"part of {type(inside).__name__} '{graph.name(inside)}'"
                              if inside is not None else
                              "not reached by the forward pass" if name not in traced else
                              "its units cannot be removed here")
        order = graph.order
        groups.sort(key=lambda g: order.get(g[0], 0))
        pairs.sort(key=lambda p: order.get(p.producer, 0))
        prunable = sorted({n for g in groups for n in g}, key=lambda s: order.get(s, 0))
        plan = PrunePlan(prunable=prunable,
                         left_alone=sorted(left.items(), key=lambda kv: order.get(kv[0], 0)),
                         groups=groups)
        return work.eval(), plan, pairs


def _summary_pair(graph: _Graph, group: Any, n: int, producer: str) -> PrunePair:
    """The group as a PrunePair: its first producer, that producer's BatchNorm, the first
    consumer reading the units, and its columns per unit (H*W after a Flatten)."""
    order = graph.order
    prod_node = next((it.dep.target for it in group
                      if graph.name(it.dep.target.module) == producer), group[0].dep.target)
    bn = next((graph.name(o.module) for o in prod_node.outputs
               if isinstance(o.module, nn.modules.batchnorm._BatchNorm)), None)
    readers = sorted(
        ((graph.name(it.dep.target.module), len(it.idxs)) for it in group
         if isinstance(it.dep.target.module, (nn.Linear, nn.modules.conv._ConvNd))
         and getattr(it.dep.handler, "__name__", "") == "prune_in_channels"),
        key=lambda r: order.get(r[0], 0))
    consumer, cols = readers[0] if readers else ("", n)
    return PrunePair(producer, consumer, bn, max(1, cols // max(1, n)))


def _chains_plan(model: nn.Module, pairs: list[PrunePair]) -> PrunePlan:
    prod = [p.producer for p in pairs]
    left = [(n, "no example input ran, so only simple chains were analysed; pass "
             "example_inputs") for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and n not in prod]
    return PrunePlan(prunable=prod, left_alone=left, groups=[[p] for p in prod],
                     method="chains")


def pruning_plan(model: nn.Module, example_inputs: Example | None = None) -> PrunePlan:
    """What ``prune_structured`` would remove from ``model`` and what it leaves alone, why.

    ``example_inputs``: a batch (or tuple of inputs) the model runs on; without it the
    input shape is guessed from the first layer, and when no guess runs only simple chains
    are analysed (see the module docstring). ``model`` is not changed.
    """
    probe = copy.deepcopy(model).eval()
    example = _find_example(probe, example_inputs)
    if example is None:
        return _chains_plan(model, _chain_pairs(model))
    return _run_graph(probe, example, None, 2)[1]


def find_prunable(model: nn.Module, example_inputs: Example | None = None) -> list[PrunePair]:
    """One PrunePair per group of units ``prune_structured`` can remove (empty: nothing).

    For a simple chain the pair is exact (producer, its consumer, the BatchNorm between,
    H*W columns per channel after a Flatten); for a coupled group it names the group's
    first producer and consumer (``pruning_plan`` lists the whole group).
    """
    probe = copy.deepcopy(model).eval()
    example = _find_example(probe, example_inputs)
    if example is None:
        return _chain_pairs(model)
    return _run_graph(probe, example, None, 2)[2]


def _chain_pairs(model: nn.Module) -> list[PrunePair]:
    """The simple producer -> consumer chains of ``model`` (torch.fx; no example input)."""
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
    """Importance of each unit of ``pair.producer`` (see the module docstring), shape (units,).

    Exact for a simple chain (a Linear/Conv2d producer and consumer); for a coupled group
    (``find_prunable`` names its first producer and consumer) ``prune_structured`` ranks
    with every layer of the group, which this pair alone does not see.
    """
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
def prune_structured(model: nn.Module, ratio: float, *, criterion: Criterion = "l2",
                     example_inputs: Example | None = None) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of every prunable group's units removed.

    ``ratio`` is a fraction in [0, 1): 0.5 removes half the channels (neurons) of each
    coupled group (``pruning_plan``), rounding to the nearest unit and keeping at least one.
    Input and output shapes never change. ``example_inputs``: a batch the model runs on
    (guessed from the first layer when not given). The copy is in eval mode; fine-tune it
    (``finetune``) to recover accuracy; ``model`` is untouched. Raises ConfigError when the
    model has nothing to prune and ``ratio > 0`` (naming what was left alone and why).
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"pruning ratio must be a fraction in [0, 1), got {ratio}")
    if criterion not in ("l1", "l2"):
        raise ConfigError(f"unknown pruning criterion '{criterion}'; use l2 or l1")
    work = copy.deepcopy(model).eval()
    if ratio == 0.0:
        return work
    example = _find_example(work, example_inputs)
    if example is None:
        return _prune_chains(work, ratio, criterion)
    pruned, plan, _ = _run_graph(work, example, ratio, 1 if criterion == "l1" else 2)
    if not plan:
        why = "; ".join(f"{n}: {w}" for n, w in plan.left_alone[:4])
        raise ConfigError(
            f"{type(model).__name__}: nothing can be pruned ({why}); use compress.prune: 0")
    return pruned


def _prune_chains(model: nn.Module, ratio: float, criterion: Criterion) -> nn.Module:
    """Simple chains only (no example input ran): remove units pair by pair, in place."""
    pairs = _chain_pairs(model)
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
