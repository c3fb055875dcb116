"""Models users bring: a broken candidate is dropped and the next ships, a recurrent
program gets a fixed-batch export that runs at any row count, a model trained in the
user's own loop is bundled with package(), compress checks a saved model against the
data, build saves its eager model and warns on a chance-level one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from toma_edge.errors import BundleError, ConfigError, InputError

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "toma_edge.cli", *args], capture_output=True,
                          text=True, timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def regressor() -> tuple[nn.Module, tuple[np.ndarray, ...]]:
    """The built-in example's model, trained briefly, with its data."""
    from toma_edge.host.example import ExampleRegressor, make_data
    from toma_edge.host.train import TrainSpec, train_model

    X, y, Xt, yt = make_data()
    torch.manual_seed(0)
    m = train_model(ExampleRegressor(), X, y, TrainSpec(task="regression", epochs=15))
    return m, (X, y, Xt, yt)


def test_a_broken_candidate_is_dropped_with_its_reason_and_the_next_ships(regressor) -> None:
    """int8 calibrated on constant rows: program and simulated-int8 model agree with each
    other on garbage. Checked against the fp32 model, it is dropped; the search goes on
    and ships a working kind."""
    from toma_edge.host.search import compress
    from toma_edge.project import CompressConfig

    m, (X, y, Xt, yt) = regressor
    constant = np.full_like(X, 0.5)
    res = compress(m, CompressConfig(quantize=["int8", "fp32"]), task="regression",
                   train=(constant, y), val=(Xt, yt), target="rpi4", max_batch=64)
    by_kind = {c.quantization: c for c in res.candidates}
    assert by_kind["int8"].dropped and "quantization is broken" in by_kind["int8"].dropped
    assert "fp32 model" in by_kind["int8"].dropped
    assert not by_kind["fp32"].dropped and res.shipped is by_kind["fp32"]
    table = res.table()
    assert "dropped: " in table and "* fp32" in table
    entry = by_kind["int8"].entry(shipped=False)
    assert entry.dropped == by_kind["int8"].dropped and entry.fits is False


def test_every_candidate_failing_is_one_line_naming_the_candidate(regressor) -> None:
    from toma_edge.host.search import compress
    from toma_edge.project import CompressConfig

    m, (X, y, Xt, yt) = regressor
    with pytest.raises(BundleError) as e:
        compress(m, CompressConfig(quantize="int8"), task="regression",
                 train=(np.zeros_like(X), y), val=(Xt, yt), target="rpi4", max_batch=64)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith("no compression candidate works: int8 pruned 0% ")


class SensorGRU(nn.Module):
    """(N, T, F) -> (N, 2): a GRU over time, then a linear head on the last state."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 12, batch_first=True)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _sequence_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6, 3)).astype(np.float32)
    y = (X[:, :, 0].sum(1) > 0).astype(np.int64)  # the sign of a channel's sum over time
    return X, y


@pytest.fixture(scope="module")
def gru_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A GRU classifier trained in our own loop, bundled with package() for max_batch 48."""
    from toma_edge.host import package

    X, y = _sequence_data(600, 0)
    torch.manual_seed(0)
    m = SensorGRU()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(m(torch.as_tensor(X[:400])), torch.as_tensor(y[:400])).backward()
        opt.step()
    m.eval()
    out = tmp_path_factory.mktemp("gru") / "bundle"
    res = package(m, X[:4], calibration=X[:256], evaluation=(X[400:], y[400:]), target="rpi4",
                  out=out, quantize="fp32", max_batch=48, name="sensor-gru",
                  classes=["low", "high"])
    assert res.out == out
    return out, m


def test_a_recurrent_model_gets_a_fixed_batch_export_the_runtime_pads(gru_bundle,
                                                                      tmp_path: Path) -> None:
    """The GRU's lowered program runs only at its export batch: the manifest says so and
    `toma-edge run` on a row count that is no multiple of it gives the eager outputs."""
    out, m = gru_bundle
    man = json.loads((out / "manifest.json").read_text())
    assert man["export_batch"] == 32 and man["max_batch"] == 32
    assert man["inputs"][0]["shape"] == [-1, 6, 3]
    assert man["build"]["command"] == "package"
    assert man["build"]["verify"]["top1_agreement"] >= 0.99
    X, _ = _sequence_data(45, 7)
    np.save(tmp_path / "x.npy", X)
    p = _cli("run", str(out), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert p.returncode == 0, p.stderr
    assert "E 00:" not in p.stderr  # no raw runtime log lines
    got = np.load(tmp_path / "y.npy")
    with torch.no_grad():
        want = torch.softmax(m(torch.as_tensor(X)), dim=-1).numpy()
    assert got.shape == (45, 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_fixed_batch_bundle_serves_any_row_count_in_process(gru_bundle) -> None:
    """The Predictor (what the service and `run` call) pads a short batch and splits a
    long one; the batch it reports is the export batch."""
    from toma_edge.device.predictor import Predictor

    out, m = gru_bundle
    p = Predictor(out, threads=1, budget="8GiB")
    try:
        assert p.fixed_batch == 32 and p.fitting_batch(1 << 40) == 32
        for n in (1, 31, 32, 33, 70):
            X, _ = _sequence_data(n, n)
            got = p.predict(X).outputs
            with torch.no_grad():
                want = torch.softmax(m(torch.as_tensor(X)), dim=-1).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    finally:
        p.program.close()


def test_package_refuses_bad_inputs_with_one_line() -> None:
    from toma_edge.host import package

    X, y = _sequence_data(80, 1)
    m = SensorGRU().eval()
    cases = [
        (dict(calibration=X[:, :5], evaluation=(X, y)), "calibration: rows of shape (5, 3)"),
        (dict(calibration=X, evaluation=(X, y[:10])), "80 rows in X but 10 targets"),
        (dict(calibration=X, evaluation=(X, y + 5)), "class indices 0..1"),
        (dict(calibration=X, evaluation=(X, y), prune=0.5), "finetune=callable"),
        (dict(calibration=X * np.nan, evaluation=(X, y)), "calibration: holds NaN"),
    ]
    for kwargs, want in cases:
        with pytest.raises((InputError, ConfigError)) as e:
            package(m, X[:2], target="rpi4", **kwargs)  # type: ignore[arg-type]
        assert want in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    with pytest.raises(InputError, match="does not run on example_inputs of shape"):
        package(m, np.zeros((2, 5)), calibration=np.zeros((4, 5)),
                evaluation=(np.zeros((4, 5)), np.zeros(4, np.int64)), target="rpi4")


CONV_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class SensorCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 8, 5)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean(-1))

    def build():
        return SensorCNN()
''')

CONV_DATA = textwrap.dedent('''
    import numpy as np

    def load():
        rng = np.random.default_rng(0)
        X = rng.normal(size=(120, 200, 10)).astype(np.float32)  # (N, T, F): not (N, C, T)
        y = rng.integers(0, 2, 120)
        return X[:100], y[:100], X[100:], y[100:]
''')


def test_compress_names_an_unimportable_class_and_a_shape_mismatch(tmp_path: Path) -> None:
    """Without --project the pickled class's module is not importable: one line saying to
    pass --project. With a project whose rows do not fit the model: one line naming the
    shape, not a traceback."""
    (tmp_path / "sensor_model.py").write_text(CONV_MODEL)
    (tmp_path / "sensor_data.py").write_text(CONV_DATA)
    (tmp_path / "toma-edge.yaml").write_text(
        "name: sensor\ntask: classification\nmodel: sensor_model:build\n"
        "data: sensor_data:load\ntrain: {epochs: 1, folds: 0}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import sensor_model  # type: ignore[import-not-found]

        torch.save(sensor_model.build(), tmp_path / "model.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("sensor_model", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = _cli("compress", str(tmp_path / "model.pt"), "--target", "rpi4", "--out",
             str(tmp_path / "out"), cwd=elsewhere)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "module 'sensor_model'" in p.stderr and "--project" in p.stderr
    p = _cli("compress", str(tmp_path / "model.pt"), "--target", "rpi4", "--project",
             str(tmp_path / "toma-edge.yaml"), "--out", str(tmp_path / "out"), cwd=elsewhere)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "rows of shape (200, 10)" in p.stderr and "3 channels" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()


CHANCE_DATA = textwrap.dedent('''
    import numpy as np

    def load():
        rng = np.random.default_rng(0)
        X = rng.normal(size=(300, 8)).astype(np.float32)
        y = rng.integers(0, 3, 300)   # labels that do not depend on X: nothing to learn
        return X[:240], y[:240], X[240:], y[240:]
''')

CHANCE_MODEL = textwrap.dedent('''
    from torch import nn

    def build():
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
''')


def test_build_saves_the_eager_model_and_warns_on_a_chance_level_one(tmp_path: Path) -> None:
    (tmp_path / "noise_model.py").write_text(CHANCE_MODEL)
    (tmp_path / "noise_data.py").write_text(CHANCE_DATA)
    (tmp_path / "toma-edge.yaml").write_text(
        "name: noise\ntask: classification\nmodel: noise_model:build\ndata: noise_data:load\n"
        "train: {epochs: 2, folds: 0}\ncompress: {quantize: [fp32, int8]}\n"
        "export: {max_batch: 16}\n")
    out = tmp_path / "dist" / "rpi4"
    p = _cli("build", "--target", "rpi4", "--project", str(tmp_path / "toma-edge.yaml"),
             "--out", str(out))
    assert p.returncode == 0, p.stderr
    text = p.stdout + p.stderr
    assert "warning: the trained model is at chance level" in text
    man = json.loads((out / "manifest.json").read_text())
    assert any("chance level" in w for w in man["build"]["warnings"])
    assert {c["quantization"] for c in man["candidates"]} == {"fp32", "int8"}
    eager = tmp_path / "dist" / "rpi4.eager.pt"
    assert man["build"]["eager_model"] == eager.name and eager.is_file()
    sys.path.insert(0, str(tmp_path))
    try:
        model = torch.load(eager, weights_only=False)
    finally:
        sys.path.remove(str(tmp_path))
    x = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert _cli("run", str(out), "-i", str(tmp_path / "x.npy"), "-o",
                str(tmp_path / "y.npy")).returncode == 0
    with torch.no_grad():
        want = torch.softmax(model(torch.as_tensor(x)), -1).numpy()
    # the shipped program computes the saved eager model (fp32 or its int8 version)
    assert (np.load(tmp_path / "y.npy").argmax(1) == want.argmax(1)).mean() >= 0.8


@pytest.mark.parametrize("n,max_batch", [(1, 64), (5, 64), (40, 64), (300, 64), (300, 256),
                                         (17, 2)])
def test_each_row_runs_once_at_every_checked_batch_size(n: int, max_batch: int) -> None:
    from toma_edge.host.verify import batch_plan, verify_batches

    plan = batch_plan(n, max_batch)
    assert sum(plan) == n and all(1 <= b <= max_batch for b in plan)
    assert plan[0] == 1
    if n >= 4 + max_batch and max_batch > 2:  # a full run when the rows allow one, and a size in between
        assert max_batch in plan and any(1 < b < max_batch for b in plan)
    if n > 5:
        assert len(set(plan)) >= 2
    assert set(plan) <= set(verify_batches(max_batch, n)) | {plan[-1]}
    fixed = batch_plan(70, 64, fixed_batch=32)
    assert fixed == [32, 32, 6]
