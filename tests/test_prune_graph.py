"""Structured pruning through the dependency graph, on the architectures users bring.

Tiny versions of a MobileNetV3-style network (depthwise conv, squeeze-excitation,
hardswish, residual adds), a ResNet (BasicBlocks with a downsample), two branches joined
by torch.cat, a Conv1d residual TCN, a GRU and a transformer encoder: each is planned
(what goes, what is left alone and why), pruned at 0.5, and the pruned copy is exported
through our pipeline and run in the ExecuTorch runtime at batch 1 and 4.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from zoo_models import BasicBlock

from toma_edge.errors import ConfigError
from toma_edge.host.prune import (
    PrunePair,
    find_prunable,
    finetune,
    prune_structured,
    pruning_plan,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- the models


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, max(2, c // 4), 1)
        self.fc2 = nn.Conv2d(max(2, c // 4), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.fc1(self.pool(x)))
        return x * nn.functional.hardsigmoid(self.fc2(s))


class InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expand, depthwise 3x3, SE, 1x1 project, residual add."""

    def __init__(self, cin: int, exp: int, cout: int, stride: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp),
                                    nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(exp, exp, 3, stride, 1, groups=exp, bias=False),
                                nn.BatchNorm2d(exp), nn.Hardswish())
        self.se = SqueezeExcite(exp)
        self.project = nn.Sequential(nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(8, 16, 8, 1), InvertedResidual(8, 24, 12, 2),
                                    InvertedResidual(12, 24, 12, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 16),
                                  nn.Hardswish(), nn.Linear(16, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class TinyResNet(nn.Module):
    def __init__(self, n_classes: int = 5, widths: tuple[int, ...] = (8, 16)) -> None:
        super().__init__()
        w0 = widths[0]
        self.conv1 = nn.Conv2d(3, w0, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        layers: list[nn.Module] = []
        cin = w0
        for i, w in enumerate(widths):
            layers += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class TwoBranchCat(nn.Module):
    """Two convolution branches joined by torch.cat, then a conv over the joined channels."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.BatchNorm2d(4), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(10, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(8 * 8 * 8, n_classes)  # Flatten of 8 channels x 8x8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(torch.flatten(h, 1))


class TemporalBlock(nn.Module):
    """A TCN block: two dilated causal Conv1d (padding, then the future chomped off)."""

    def __init__(self, cin: int, cout: int, dilation: int) -> None:
        super().__init__()
        self.pad = 2 * dilation
        self.conv1 = nn.Conv1d(cin, cout, 3, padding=self.pad, dilation=dilation)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=self.pad, dilation=dilation)
        self.down = nn.Conv1d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x)[:, :, : -self.pad])
        y = torch.relu(self.conv2(y)[:, :, : -self.pad])
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyTCN(nn.Module):
    """(N, T, F) sensor windows in, a regression value out."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(TemporalBlock(features, 12, 1), TemporalBlock(12, 12, 2),
                                    TemporalBlock(12, 16, 4))
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x.transpose(1, 2))
        return self.out(h[:, :, -1])


class TinyGRU(nn.Module):
    def __init__(self, features: int = 4, n_classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(features, 8)
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(torch.relu(self.inp(x)))
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    def __init__(self, features: int = 4, d: int = 16, n_classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


IMAGE = (3, 16, 16)
SEQUENCE = (12, 4)
SHORT = (4, 4)  # recurrent export unrolls the steps: a short window keeps it quick


def _warm(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, *shape))
    return model.eval()


def _params(m: nn.Module) -> int:
    return sum(t.numel() for t in m.parameters())


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _exports_and_runs(pruned: nn.Module, shape: tuple[int, ...], tmp_path: Path) -> None:
    """The pruned copy goes through our export and runs in the runtime like eager."""
    from toma_edge.device.adapter import load_program
    from toma_edge.host.export import export_net, export_program

    net = export_net(pruned, "classification")
    example = torch.rand(32, *shape)
    res = export_program(net, example, max_batch=32, quantize="fp32")
    path = tmp_path / "res.pte"
    path.write_bytes(res.pte)
    prog = load_program(path, threads=1)
    rng = np.random.default_rng(0)
    fixed = getattr(res, "fixed_batch", None)  # recurrent graphs: one batch size, padded
    for batch in (1, 4):
        x = rng.random((batch, *shape), dtype=np.float32)
        rows = x if fixed is None else np.concatenate([x, np.zeros((fixed - batch, *shape),
                                                                   np.float32)])
        got = prog.run([np.ascontiguousarray(rows)])[0][:batch]
        with torch.no_grad():
            want = net(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _prune_checked(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """prune_structured at 0.5: smaller, same output shape, the original untouched."""
    before = copy.deepcopy(model)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        want = model(x)
    pruned = prune_structured(model, 0.5, example_inputs=torch.rand(2, *shape))
    assert _same_weights(model, before)
    assert _params(pruned) < _params(model)
    with torch.no_grad():
        assert pruned(x).shape == want.shape
        torch.testing.assert_close(model(x), want)  # the original still computes the same
    return pruned


# ---------------------------------------------------------------- the tests


def test_mobilenet_style_couples_depthwise_se_and_residual(tmp_path: Path) -> None:
    m = _warm(TinyMobileNet(), IMAGE)
    plan = pruning_plan(m, torch.rand(2, *IMAGE))
    # the residual add ties the stem to the first block's projection; the expand conv,
    # the depthwise conv that follows its channels and the SE gate go together
    assert ["stem.0", "blocks.0.project.0"] in plan.groups
    assert ["blocks.0.expand.0", "blocks.0.dw.0", "blocks.0.se.fc2"] in plan.groups
    assert ["blocks.1.project.0", "blocks.2.project.0"] in plan.groups
    assert plan.left_alone == [("head.4", "its channels are the model's output (shape kept)")]
    assert "head.2" in plan.prunable and "head.4" not in plan.prunable
    p: Any = _prune_checked(m, IMAGE)
    dw = p.blocks[0].dw[0]
    assert dw.groups == dw.in_channels == dw.out_channels == 8  # 16 -> 8, still depthwise
    assert p.blocks[0].se.fc2.out_channels == 8 and p.blocks[0].project[0].in_channels == 8
    assert p.stem[0].out_channels == p.blocks[0].project[0].out_channels == 4
    assert p.head[4].out_features == 5
    _exports_and_runs(p, IMAGE, tmp_path)


def test_resnet_style_prunes_residual_pairs_with_downsample(tmp_path: Path) -> None:
    m = _warm(TinyResNet(), IMAGE)
    plan = pruning_plan(m, torch.rand(2, *IMAGE))
    # the stream of each stage: stem (or downsample) and every block's second conv
    assert ["conv1", "layers.0.conv2", "layers.1.conv2"] in plan.groups
    assert ["layers.2.conv2", "layers.2.downsample.0", "layers.3.conv2"] in plan.groups
    assert ["layers.0.conv1"] in plan.groups
    assert plan.left_alone == [("fc", "its channels are the model's output (shape kept)")]
    p: Any = _prune_checked(m, IMAGE)
    assert p.conv1.out_channels == p.layers[1].conv2.out_channels == 4
    assert p.layers[2].downsample[0].out_channels == p.layers[3].conv2.out_channels == 8
    assert p.fc.in_features == 8 and p.fc.out_features == 5
    _exports_and_runs(p, IMAGE, tmp_path)


def test_concatenated_branches_keep_their_offsets(tmp_path: Path) -> None:
    m = _warm(TwoBranchCat(), IMAGE)
    plan = pruning_plan(m, torch.rand(2, *IMAGE))
    assert ["a.0"] in plan.groups and ["b.0"] in plan.groups and ["mix.0"] in plan.groups
    p: Any = _prune_checked(m, IMAGE)
    assert (p.a[0].out_channels, p.b[0].out_channels, p.mix[0].in_channels) == (3, 2, 5)
    assert p.fc.in_features == 4 * 8 * 8  # 4 channels kept, each still 8x8 columns
    _exports_and_runs(p, IMAGE, tmp_path)


def test_tcn_conv1d_residual_blocks(tmp_path: Path) -> None:
    m = _warm(TinyTCN(), SEQUENCE)
    plan = pruning_plan(m, torch.rand(2, *SEQUENCE))
    assert ["blocks.0.conv2", "blocks.0.down", "blocks.1.conv2"] in plan.groups
    assert ("out", "its channels are the model's output (shape kept)") in plan.left_alone
    p: Any = _prune_checked(m, SEQUENCE)
    assert p.blocks[0].conv1.out_channels == 6 and p.blocks[2].conv2.out_channels == 8
    assert p.blocks[1].conv1.dilation == (2,)
    _exports_and_runs(p, SEQUENCE, tmp_path)


def test_gru_is_left_alone_and_named_its_head_pruned(tmp_path: Path) -> None:
    m = _warm(TinyGRU(), SHORT)
    plan = pruning_plan(m, torch.rand(2, *SHORT))
    alone = dict(plan.left_alone)
    assert alone["gru"].startswith("recurrent layer")
    assert alone["inp"] == "coupled with GRU 'gru', which is left alone"
    assert plan.groups == [["head.0"]]
    p: Any = _prune_checked(m, SHORT)
    assert (p.gru.input_size, p.gru.hidden_size) == (8, 16)
    assert p.head[0].out_features == 6 and p.head[2].out_features == 3
    _exports_and_runs(p, SHORT, tmp_path)


def test_transformer_prunes_feedforward_leaves_attention_stream_alone(tmp_path: Path) -> None:
    m = _warm(TinyTransformer(), SEQUENCE)
    plan = pruning_plan(m, torch.rand(2, *SEQUENCE))
    alone = dict(plan.left_alone)
    assert plan.groups == [["encoder.layers.0.linear1"]]
    assert alone["encoder.layers.0.self_attn"].startswith("attention")
    attn = "coupled with MultiheadAttention 'encoder.layers.0.self_attn', which is left alone"
    assert alone["embed"] == alone["encoder.layers.0.linear2"] == attn
    assert alone["head"] == "its channels are the model's output (shape kept)"
    p: Any = _prune_checked(m, SEQUENCE)
    layer = p.encoder.layers[0]
    assert layer.linear1.out_features == layer.linear2.in_features == 16
    assert layer.self_attn.embed_dim == 16 and layer.linear2.out_features == 16
    _exports_and_runs(p, SEQUENCE, tmp_path)


def test_pruned_mobilenet_still_trains() -> None:
    from toma_edge.host.train import TrainSpec

    m = _warm(TinyMobileNet(n_classes=3), IMAGE)
    p = prune_structured(m, 0.5, example_inputs=torch.rand(2, *IMAGE))
    rng = np.random.default_rng(0)
    X = rng.random((64, *IMAGE), dtype=np.float32)
    y = (X[:, 0].mean(axis=(1, 2)) * 3).astype(np.int64).clip(0, 2)
    spec = TrainSpec(task="classification", epochs=2, lr=1e-2, batch_size=16)
    tuned = finetune(p, X, y, spec, epochs=2)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(tuned(torch.from_numpy(X)), torch.from_numpy(y))
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(),
                                                      p.state_dict().values(), strict=True)) \
        or tuned is p  # trained in place


def test_nothing_prunable_is_refused_with_the_layers_named() -> None:
    m = nn.Sequential(nn.GRU(4, 8, batch_first=True))

    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.gru(x)[0][:, -1])

    x = torch.rand(2, *SEQUENCE)
    plan = pruning_plan(Last(), x)
    assert not plan and find_prunable(Last(), x) == []
    assert dict(plan.left_alone) == {
        "gru": "recurrent layer: its hidden size and gates are kept",
        "head": "its channels are the model's output (shape kept)"}
    with pytest.raises(ConfigError, match="nothing can be pruned.*gru: recurrent"):
        prune_structured(Last(), 0.5, example_inputs=x)
    assert prune_structured(Last(), 0.0, example_inputs=x) is not None  # ratio 0: a copy
    with pytest.raises(ConfigError, match="does not run on the example input"):
        pruning_plan(m, torch.rand(2, 3, 3))


def _digits_cnn() -> Any:
    path = Path(__file__).resolve().parent.parent / "examples" / "digits_cnn" / "cnn_model.py"
    spec = importlib.util.spec_from_file_location("digits_cnn_model_for_graph_tests", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return _warm(mod.DigitsCNN(), (64,))


@torch.no_grad()
@pytest.mark.parametrize("criterion", ["l2", "l1"])
def test_graph_criterion_matches_the_chain_criterion_on_simple_chains(criterion: Any) -> None:
    """On a plain chain the group criterion is the documented ||in_j|| * ||out_j||."""
    m = _digits_cnn()
    x = torch.rand(2, 64) * 16
    # no example input: the input shape cannot be guessed (rows reshaped inside), chains
    by_chain = prune_structured(m, 0.5, criterion=criterion)
    by_graph = prune_structured(m, 0.5, criterion=criterion, example_inputs=x)
    assert find_prunable(m, x) == find_prunable(m) == [
        PrunePair("net.0", "net.3", "net.1", 1), PrunePair("net.3", "net.8", "net.4", 16),
        PrunePair("net.8", "net.10", None, 1)]
    assert pruning_plan(m).method == "chains" and pruning_plan(m, x).method == "dependency graph"
    assert _same_weights(by_chain, by_graph)


def test_input_shape_is_guessed_from_the_first_layer() -> None:
    m = _warm(TinyResNet(), IMAGE)
    assert pruning_plan(m).groups == pruning_plan(m, torch.rand(2, *IMAGE)).groups
    assert pruning_plan(TinyGRU()).method == "dependency graph"


def test_resnet18_sized_model_prunes_in_well_under_a_few_seconds() -> None:
    m = TinyResNet(n_classes=10, widths=(64, 128, 256, 512)).eval()  # ResNet-18's widths
    assert _params(m) > 11_000_000
    t0 = time.perf_counter()
    p = prune_structured(m, 0.5, example_inputs=torch.rand(2, 3, 32, 32))
    took = time.perf_counter() - t0
    assert _params(p) < 0.35 * _params(m)
    assert took < 3.0, f"pruning a ResNet-18-sized model took {took:.2f} s"


class HardCodedView(nn.Module):
    """A reshape with sizes written into the forward: pruning ``a`` would break it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 12), nn.Linear(4, 8)
        self.c, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).view(-1, 3, 4).sum(dim=1)  # 12 units read as 3 x 4
        return self.out(torch.relu(self.c(torch.relu(self.b(h)))))


def test_a_group_that_breaks_the_forward_pass_is_left_alone_and_named() -> None:
    x = torch.rand(2, 4)
    plan = pruning_plan(HardCodedView(), x)
    assert dict(plan.left_alone)["a"].startswith("pruning it broke the forward pass")
    assert plan.groups == [["b"], ["c"]]
    p: Any = prune_structured(HardCodedView(), 0.5, example_inputs=x)
    assert (p.a.out_features, p.b.out_features, p.c.out_features) == (12, 4, 4)
    assert p(torch.rand(5, 4)).shape == (5, 2)


def test_weight_norm_is_folded_in_the_copy_and_the_original_still_runs() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    m: Any = _warm(TinyTCN(), SEQUENCE)
    for block in m.blocks:
        block.conv1 = weight_norm(block.conv1)
    x = torch.rand(3, *SEQUENCE)
    with torch.no_grad():
        want = m(x)
    p: Any = prune_structured(m, 0.5, example_inputs=x[:2])
    assert type(p.blocks[0].conv1) is nn.Conv1d and p.blocks[0].conv1.out_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(m(x), want)  # the caller's parametrized model untouched
        assert p(x).shape == want.shape
    assert pruning_plan(m, x).groups == pruning_plan(TinyTCN(), x).groups
