"""The model zoo: architectures people put on a Pi, not ours, with learnable synthetic data.

    import zoo_models as zoo                      # tests/ on sys.path
    model = zoo.ZOO["mnv3"].model("tiny")         # a torch.nn.Module, random init
    X, y, Xt, yt = zoo.ZOO["mnv3"].data("tiny")   # numpy, seeded, no download
    folder = zoo.write_project("mnv3", "tiny", tmp_path / "mnv3")   # toma-edge.yaml there
    # toma-edge build --target rpi4 --project folder/toma-edge.yaml --out dist/mnv3

Models (factory: sizes; "tiny" is the suite's, seconds to train; "real" is the bench's):

- ``mobilenet_v3_small`` (zoo name ``mnv3``): depthwise convolutions, squeeze-excitation,
  hardswish, residual adds, written here after torchvision's MobileNetV3-Small (its wheel
  cannot be imported with the CPU torch). real: the full 11-block config, 3x64x64, 10 classes.
- ``resnet18`` (``resnet18``): BasicBlocks [2, 2, 2, 2], written here. real: width 64,
  3x64x64, 10 classes.
- ``efficientnet_b0`` (``effnet_b0``): the ``efficientnet-pytorch`` package's
  ``EfficientNet.from_name('efficientnet-b0', ...)``, random init, plain Swish so it exports.
- ``tcn`` (``tcn``): ``pytorch_tcn.TCN`` over (N, T, F) sensor rows, last step -> classes.
- ``gru_regressor`` (``gru``): GRU over (N, T, F) -> one value (regression).
- ``lstm_classifier`` (``lstm``): LSTM over (N, T, F) -> classes.
- ``bert_encoder`` (``bert``): a Hugging Face ``transformers`` BertModel built from a
  config (random weights) fed float features through ``inputs_embeds``, mean-pooled,
  linear head; forward(x) takes one float tensor (N, T, F).

Data (numpy, seeded; the task itself — class patterns, target function — is fixed by a
task seed, so rows drawn with another ``seed`` are fresh rows of the same task):

- ``image_task``: class-dependent oriented gratings and blobs per channel, random
  amplitude and shift, Gaussian noise; (N, C, H, W) float32, labels 0..classes-1.
- ``sequence_task``: (N, T, F) sequences; classification: each class a frequency and a
  channel mix, random phase and amplitude plus noise; regression: the target is a fixed
  function of the random amplitude and frequency of the sequence's sinusoid.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ZOO", "ZooEntry", "write_project", "image_task", "sequence_task",
           "mobilenet_v3_small", "resnet18", "efficientnet_b0", "tcn", "gru_regressor",
           "lstm_classifier", "bert_encoder"]

TESTS_DIR = Path(__file__).resolve().parent
_TASK_SEED = 20260  # fixes the task (patterns, target function); ``seed`` draws the rows


# -- data ------------------------------------------------------------------------------


def image_task(n: int, *, channels: int = 3, size: int = 64, classes: int = 10,
               seed: int = 0, noise: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (N, C, size, size) float32 and their labels (N,) int64.

    Class c is a sum of two oriented gratings (angle, frequency, per-channel weights fixed
    by the task seed) and a Gaussian blob at a class position; each row gets a random
    amplitude (0.7..1.3), a random shift (up to size/8 pixels each way) and noise of
    standard deviation ``noise``. Learnable well above chance in a few epochs by a CNN.
    """
    task = np.random.default_rng(_TASK_SEED + 7 * classes + channels)
    angles = task.uniform(0, np.pi, size=(classes, 2))
    freqs = task.uniform(1.5, 4.0, size=(classes, 2))
    mix = task.normal(size=(classes, 2, channels))
    centres = task.uniform(0.25, 0.75, size=(classes, 2))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    grid = np.linspace(0.0, 1.0, size, dtype=np.float64)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    max_shift = max(1, size // 8)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    amp = rng.uniform(0.7, 1.3, size=n)
    X = np.empty((n, channels, size, size), np.float32)
    protos = np.empty((classes, channels, size, size), np.float64)
    for c in range(classes):
        img = np.zeros((channels, size, size))
        for k in range(2):
            a, f = angles[c, k], freqs[c, k]
            wave = np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)))
            img += mix[c, k][:, None, None] * wave
        blob = np.exp(-((xx - centres[c, 0]) ** 2 + (yy - centres[c, 1]) ** 2) / 0.02)
        img += 1.5 * blob
        protos[c] = img
    for i in range(n):
        img = np.roll(protos[y[i]], tuple(shifts[i]), axis=(1, 2))
        X[i] = amp[i] * img + rng.normal(scale=noise, size=img.shape)
    return X, y.astype(np.int64)


def sequence_task(n: int, *, steps: int = 50, features: int = 4, classes: int = 4,
                  task: str = "classification", seed: int = 0, noise: float = 0.3
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences (N, steps, features) float32 and their targets.

    classification: class c is a sinusoid of frequency f_c mixed into the features with
    class weights, random phase, amplitude 0.5..1.5, plus noise; labels (N,) int64.
    regression: one sinusoid of random amplitude a (0.5..2) and frequency f (0.5..3 cycles
    over the sequence) mixed into the features; target (N,) float32 = a * (1 + 0.5 f)
    standardised over the task's range (roughly zero mean, unit spread).
    """
    t_rng = np.random.default_rng(_TASK_SEED + 13 * features + classes)
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, steps)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    if task == "classification":
        freqs = np.linspace(1.0, 1.0 + 1.5 * classes, classes)
        weights = t_rng.normal(size=(classes, features))
        y = rng.integers(0, classes, size=n)
        amp = rng.uniform(0.5, 1.5, size=(n, 1))
        wave = amp * np.sin(2 * np.pi * freqs[y][:, None] * t[None, :] + phase)
        X = wave[:, :, None] * weights[y][:, None, :]
        X = X + rng.normal(scale=noise, size=X.shape)
        return X.astype(np.float32), y.astype(np.int64)
    weights = t_rng.normal(size=features)
    a = rng.uniform(0.5, 2.0, size=n)
    f = rng.uniform(0.5, 3.0, size=n)
    wave = a[:, None] * np.sin(2 * np.pi * f[:, None] * t[None, :] + phase)
    X = wave[:, :, None] * weights[None, None, :]
    X = X + rng.normal(scale=noise, size=X.shape)
    target = a * (1 + 0.5 * f)
    return X.astype(np.float32), ((target - 2.1) / 1.2).astype(np.float32)


# -- MobileNetV3-Small -----------------------------------------------------------------


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: avg pool, 1x1 reduce, ReLU, 1x1 expand, hardsigmoid."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


def _conv_bn_act(cin: int, cout: int, k: int, stride: int, groups: int, act: str | None,
                 momentum: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups,
                                         bias=False),
                               nn.BatchNorm2d(cout, momentum=momentum)]
    if act == "HS":
        layers.append(nn.Hardswish())
    elif act == "RE":
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV3 bneck: expand 1x1, depthwise kxk (stride), optional SE, project 1x1,
    residual add when stride 1 and channels match."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act: str,
                 stride: int, momentum: float) -> None:
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_conv_bn_act(cin, exp, 1, 1, 1, act, momentum))
        layers.append(_conv_bn_act(exp, exp, k, stride, exp, act, momentum))
        if se:
            layers.append(SqueezeExcite(exp, _divisible(exp // 4)))
        layers.append(_conv_bn_act(exp, cout, 1, 1, 1, None, momentum))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res else out


#: torchvision's mobilenet_v3_small config: (kernel, expanded, out, SE, activation, stride)
MNV3_SMALL = [
    (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
]


class MobileNetV3(nn.Module):
    """MobileNetV3-Small after torchvision: stem conv 3x3/2 hardswish, bnecks, 1x1 conv,
    avg pool, Linear, hardswish, dropout, Linear -> logits."""

    def __init__(self, config: list[tuple[int, int, int, bool, str, int]], *,
                 in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 last_channels: int = 1024, bn_momentum: float = 0.1,
                 dropout: float = 0.2) -> None:
        super().__init__()
        first = _divisible(16 * width)
        layers: list[nn.Module] = [_conv_bn_act(in_channels, first, 3, 2, 1, "HS",
                                                bn_momentum)]
        cin = first
        for k, exp, out, se, act, stride in config:
            e, o = _divisible(exp * width), _divisible(out * width)
            layers.append(InvertedResidual(cin, k, e, o, se, act, stride, bn_momentum))
            cin = o
        last_conv = 6 * cin
        layers.append(_conv_bn_act(cin, last_conv, 1, 1, 1, "HS", bn_momentum))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channels), nn.Hardswish(), nn.Dropout(dropout),
            nn.Linear(last_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def mobilenet_v3_small(*, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                       blocks: int = 11, last_channels: int = 1024,
                       bn_momentum: float = 0.1) -> nn.Module:
    """MobileNetV3-Small (the first ``blocks`` of its 11 bnecks, channels x ``width``).
    ``bn_momentum`` 0.01 is torchvision's; 0.1 (PyTorch's default) settles in few epochs."""
    return MobileNetV3(MNV3_SMALL[:blocks], in_channels=in_channels, num_classes=num_classes,
                       width=width, last_channels=last_channels, bn_momentum=bn_momentum)


# -- ResNet-18 -------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet's basic block (torchvision's layout and attribute names)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + idt)


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks: conv 7x7/2, max pool 3x3/2, four stages
    (width, 2w, 4w, 8w; stride 1, 2, 2, 2), avg pool, Linear -> logits."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), *, in_channels: int = 3,
                 num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages: list[nn.Module] = []
        cin = width
        for i, n in enumerate(layers):
            cout = width * 2 ** i
            for j in range(n):
                stages.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18(*, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> nn.Module:
    """ResNet-18 ([2, 2, 2, 2] BasicBlocks), stage widths width x (1, 2, 4, 8)."""
    return ResNet((2, 2, 2, 2), in_channels=in_channels, num_classes=num_classes, width=width)


# -- EfficientNet-B0 (efficientnet-pytorch) ----------------------------------------------


def efficientnet_b0(*, in_channels: int = 3, num_classes: int = 10, image_size: int = 64,
                    width: float = 1.0, depth: float = 1.0, bn_momentum: float = 0.01
                    ) -> nn.Module:
    """``EfficientNet.from_name('efficientnet-b0')``, random init; ``width``/``depth``
    override B0's coefficients (1.0, 1.0) for a smaller suite model; ``bn_momentum`` in
    PyTorch's convention (the package's default 0.99 is 0.01 here: running statistics that
    need hundreds of steps to settle). Static same padding
    (image_size given) and plain Swish (the memory-efficient one is a custom autograd
    Function that export cannot trace)."""
    from efficientnet_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-b0", in_channels=in_channels,
                                   num_classes=num_classes, image_size=image_size,
                                   width_coefficient=width, depth_coefficient=depth,
                                   batch_norm_momentum=1.0 - bn_momentum)
    model.set_swish(memory_efficient=False)
    return model


# -- sequence models ---------------------------------------------------------------------


class TCNClassifier(nn.Module):
    """pytorch-tcn's TCN over (N, T, F) rows (input_shape NLC), last step -> Linear."""

    def __init__(self, features: int, channels: tuple[int, ...], num_classes: int,
                 kernel_size: int) -> None:
        super().__init__()
        from pytorch_tcn import TCN

        self.tcn = TCN(features, list(channels), kernel_size=kernel_size, causal=True,
                       input_shape="NLC")
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tcn(x)[:, -1, :])


def tcn(*, features: int = 4, channels: tuple[int, ...] = (32, 32, 32, 32),
        num_classes: int = 4, kernel_size: int = 4) -> nn.Module:
    """A pytorch-tcn TCN (its defaults: weight norm, dropout 0.1, causal) and a linear head."""
    return TCNClassifier(features, channels, num_classes, kernel_size)


class RecurrentHead(nn.Module):
    """GRU or LSTM (batch_first) over (N, T, F), last step's output -> Linear."""

    def __init__(self, kind: str, features: int, hidden: int, layers: int, outputs: int
                 ) -> None:
        super().__init__()
        cls = nn.GRU if kind == "gru" else nn.LSTM
        self.rnn = cls(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1, :])


def gru_regressor(*, features: int = 4, hidden: int = 64, layers: int = 2) -> nn.Module:
    """GRU regressor: (N, T, F) -> one value per row (shape (N, 1))."""
    return RecurrentHead("gru", features, hidden, layers, 1)


def lstm_classifier(*, features: int = 4, hidden: int = 64, layers: int = 2,
                    num_classes: int = 4) -> nn.Module:
    """LSTM classifier: (N, T, F) -> logits."""
    return RecurrentHead("lstm", features, hidden, layers, num_classes)


class BertOnFeatures(nn.Module):
    """A transformers BertModel (random weights from a config) over float features:
    Linear(F -> hidden) as inputs_embeds, mean over steps, Linear -> logits."""

    def __init__(self, features: int, hidden: int, layers: int, heads: int, steps: int,
                 num_classes: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=8, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=4 * hidden,
                         max_position_embeddings=max(steps, 8), hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        self.embed = nn.Linear(features, hidden)
        self.encoder = BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(inputs_embeds=self.embed(x)).last_hidden_state
        return self.head(h.mean(dim=1))


def bert_encoder(*, features: int = 4, hidden: int = 64, layers: int = 2, heads: int = 4,
                 steps: int = 50, num_classes: int = 4) -> nn.Module:
    """A small BERT encoder (hidden, layers, heads; feed-forward 4 x hidden) with a head."""
    return BertOnFeatures(features, hidden, layers, heads, steps, num_classes)


# -- the zoo -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: factory and data at the suite's ("tiny") and bench's ("real") sizes,
    and the project settings a user would write first."""

    name: str
    task: str
    factory: Callable[..., nn.Module]
    sizes: dict[str, dict[str, Any]]
    data_fn: Callable[..., tuple[np.ndarray, np.ndarray]]
    data_sizes: dict[str, dict[str, Any]]
    rows: dict[str, tuple[int, int]]
    train: dict[str, dict[str, Any]]
    compress: dict[str, Any] = field(default_factory=lambda: {"quantize": "auto",
                                                               "prune": "auto"})
    max_batch: int = 64
    classes: int = 0

    def model(self, size: str) -> nn.Module:
        torch.manual_seed(0)
        return self.factory(**self.sizes[size])

    def rows_of(self, size: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` rows of this model's task drawn with ``seed`` (fresh rows: another seed)."""
        return self.data_fn(n, seed=seed, **self.data_sizes[size])

    def data(self, size: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n_tr, n_te = self.rows[size]
        X, y = self.rows_of(size, n_tr, seed=0)
        Xt, yt = self.rows_of(size, n_te, seed=1)
        return X, y, Xt, yt


_IMG_TINY = {"channels": 3, "size": 16, "classes": 10}
_IMG_REAL = {"channels": 3, "size": 64, "classes": 10}
_SEQ_TINY = {"steps": 20, "features": 4, "classes": 4}
_SEQ_REAL = {"steps": 50, "features": 4, "classes": 4}
_REG_TINY = {"steps": 20, "features": 4, "task": "regression"}
_REG_REAL = {"steps": 50, "features": 4, "task": "regression"}


def _train(epochs: int, lr: float = 2e-3, batch: int = 32) -> dict[str, Any]:
    return {"epochs": epochs, "lr": lr, "batch_size": batch, "folds": 0, "seed": 0}


ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("mnv3", "classification", mobilenet_v3_small,
             {"tiny": {"width": 0.5, "blocks": 4, "last_channels": 64},
              "real": {"width": 1.0, "blocks": 11, "last_channels": 1024}},
             image_task, {"tiny": _IMG_TINY, "real": _IMG_REAL},
             {"tiny": (600, 200), "real": (2000, 500)},
             {"tiny": _train(6), "real": _train(8)}, classes=10),
    ZooEntry("resnet18", "classification", resnet18,
             {"tiny": {"width": 8}, "real": {"width": 64}},
             image_task, {"tiny": _IMG_TINY, "real": _IMG_REAL},
             {"tiny": (600, 200), "real": (2000, 500)},
             {"tiny": _train(5), "real": _train(6)}, classes=10),
    ZooEntry("effnet_b0", "classification", efficientnet_b0,
             {"tiny": {"image_size": 16, "width": 0.25, "depth": 0.25, "bn_momentum": 0.1},
              "real": {"image_size": 64, "width": 1.0, "depth": 1.0}},
             image_task, {"tiny": _IMG_TINY, "real": _IMG_REAL},
             {"tiny": (600, 200), "real": (2000, 500)},
             {"tiny": _train(6), "real": _train(10)}, classes=10),
    ZooEntry("tcn", "classification", tcn,
             {"tiny": {"channels": (16, 16, 16), "kernel_size": 3},
              "real": {"channels": (32, 32, 32, 32), "kernel_size": 4}},
             sequence_task, {"tiny": _SEQ_TINY, "real": _SEQ_REAL},
             {"tiny": (600, 200), "real": (2000, 500)},
             {"tiny": _train(6), "real": _train(15)}, classes=4),
    ZooEntry("gru", "regression", gru_regressor,
             {"tiny": {"hidden": 16, "layers": 1}, "real": {"hidden": 64, "layers": 2}},
             sequence_task, {"tiny": _REG_TINY, "real": _REG_REAL},
             {"tiny": (600, 200), "real": (2000, 500)},
             {"tiny": _train(8, lr=5e-3), "real": _train(20)}),
    ZooEntry("lstm", "classification", lstm_classifier,
             {"tiny": {"hidden": 16, "layers": 1}, "real": {"hidden": 64, "layers": 2}},
             sequence_task, {"tiny": _SEQ_TINY, "real": _SEQ_REAL},
             {"tiny": (600, 200), "real": (2000, 500)},
             {"tiny": _train(8, lr=5e-3), "real": _train(20)}, classes=4),
    ZooEntry("bert", "classification", bert_encoder,
             {"tiny": {"hidden": 16, "layers": 1, "heads": 2, "steps": 20},
              "real": {"hidden": 64, "layers": 2, "heads": 4, "steps": 50}},
             sequence_task, {"tiny": _SEQ_TINY, "real": _SEQ_REAL},
             {"tiny": (600, 200), "real": (2000, 500)},
             {"tiny": _train(6), "real": _train(15)}, classes=4),
]}


_PROJECT_MODULE = '''"""Generated by tests/zoo_models.py: the zoo model {name!r} at size {size!r}."""
import sys

sys.path.insert(0, {tests!r})
import zoo_models  # noqa: E402


def model():
    return zoo_models.ZOO[{name!r}].model({size!r})


def data():
    return zoo_models.ZOO[{name!r}].data({size!r})
'''


def write_project(name: str, size: str, folder: Path, **settings: Any) -> Path:
    """Write ``folder/toma-edge.yaml`` and its module for zoo model ``name`` at ``size``
    ("tiny" or "real"); ``settings`` replace top-level project keys (e.g. compress=...).
    Returns the project file's path."""
    import yaml

    e = ZOO[name]
    folder.mkdir(parents=True, exist_ok=True)
    mod = f"zoo_{name}_{size}"
    (folder / f"{mod}.py").write_text(_PROJECT_MODULE.format(name=name, size=size,
                                                             tests=str(TESTS_DIR)))
    proj: dict[str, Any] = {"name": f"zoo-{name}-{size}", "task": e.task,
                            "model": f"{mod}:model", "data": f"{mod}:data",
                            "train": e.train[size], "compress": e.compress,
                            "export": {"max_batch": e.max_batch}}
    if e.task == "classification":
        proj["classes"] = [f"c{i}" for i in range(e.classes)]
    proj.update(settings)
    path = folder / "toma-edge.yaml"
    path.write_text(yaml.safe_dump(proj, sort_keys=False))
    return path


# -- build, run and compare (shared by tests/test_zoo.py and bench/bench_zoo.py) ---------


REPO = TESTS_DIR.parent


def cli(*args: str, timeout: float = 900.0, log: Path | None = None
        ) -> tuple[int, float, str, str]:
    """Run ``toma-edge ARGS`` in a fresh process (one torch thread, like a user with
    OMP_NUM_THREADS=1 on a shared machine): (exit code, wall seconds, stdout, stderr).
    With ``log``, stdout and stderr also go to that file as they come (a long build's
    progress can be followed there)."""
    import os
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO),
                                                     os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "toma_edge.cli", *args]
    t = time.perf_counter()
    if log is None:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO),
                           timeout=timeout)
        return r.returncode, time.perf_counter() - t, r.stdout, r.stderr
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                            timeout=timeout).returncode
    text = log.read_text(errors="replace")
    return rc, time.perf_counter() - t, text, text


def last_error(stderr: str) -> str:
    """The line a user would read: the exception of a traceback (marked so), else the last
    line starting with "error", else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception):", ln)]
    if "Traceback (most recent call last)" in stderr and raised:
        return f"(traceback) {raised[-1]}"[:400]
    errs = [ln for ln in lines if ln.lower().startswith("error")]
    return (errs or lines or ["(no output)"])[-1][:400]


def eager_path(out: Path) -> Path:
    """Where build saves the trained eager fp32 model beside the bundle ``out``."""
    return Path(str(out) + ".eager.pt")


def load_eager(out: Path) -> nn.Module:
    m = torch.load(eager_path(out), weights_only=False)
    m.eval()
    return m  # type: ignore[no-any-return]


def eager_outputs(model: nn.Module, X: np.ndarray, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.as_tensor(X[i:i + batch])).numpy()
                               for i in range(0, len(X), batch)])


def compare(task: str, bundle_out: np.ndarray, eager_out: np.ndarray, y: np.ndarray
            ) -> dict[str, float]:
    """What the task cares about, bundle against eager on the same fresh rows.

    classification: ``agreement`` (top-1 of the bundle's probabilities = top-1 of eager's
    logits), ``bundle_accuracy``, ``eager_accuracy``. regression: ``rmse_diff`` =
    |RMSE(bundle) - RMSE(eager)| / std(y), ``r2_vs_eager`` (bundle's predictions scored
    against eager's), ``bundle_rmse``, ``eager_rmse``."""
    if task == "classification":
        b, e = bundle_out.argmax(axis=1), eager_out.argmax(axis=1)
        return {"agreement": float((b == e).mean()), "bundle_accuracy": float((b == y).mean()),
                "eager_accuracy": float((e == y).mean())}
    b, e = bundle_out.reshape(len(y)), eager_out.reshape(len(y))
    rb, re_ = float(np.sqrt(np.mean((b - y) ** 2))), float(np.sqrt(np.mean((e - y) ** 2)))
    ss = float(np.sum((e - e.mean()) ** 2)) or 1e-12
    return {"rmse_diff": abs(rb - re_) / float(np.std(y)), "bundle_rmse": rb,
            "eager_rmse": re_, "r2_vs_eager": 1.0 - float(np.sum((b - e) ** 2)) / ss}


#: classifiers: top-1 agreement at least this; regressors: rmse_diff at most this
MIN_AGREEMENT = 0.97
MAX_RMSE_DIFF = 0.05

