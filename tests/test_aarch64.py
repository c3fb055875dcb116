"""Bundles built here run on aarch64: the Pi's wheels, installed from exactly the files
`toma-edge wheels --target rpi` writes, run `toma-edge run` under qemu-aarch64 (Cortex-A72)
with the arm64 CPython 3.11 of Debian 12, and give the host's predictions.

Needs scripts/aarch64_env.sh's tools (it installs them: apt-get, as root). One emulated
process runs everything, because an emulated interpreter takes seconds to start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
CNN = REPO / "examples" / "digits_cnn"

pytestmark = [pytest.mark.aarch64, pytest.mark.slow]


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The digits CNN (Conv2d, BatchNorm, pooling, Linear) shipped in fp32."""
    from toma_edge.host import build

    proj = tmp_path_factory.mktemp("cnn-fp32")
    for f in CNN.glob("*.py"):
        shutil.copy(f, proj / f.name)
    text = (CNN / "toma-edge.yaml").read_text()
    text = text.replace("compress: {quantize: auto, prune: auto}", "compress: {quantize: none, prune: 0.0}")
    text = text.replace("epochs: 20", "epochs: 3")
    assert "quantize: none" in text and "epochs: 3" in text
    (proj / "toma-edge.yaml").write_text(text)
    res = build(target="rpi", project=proj / "toma-edge.yaml", out=proj / "bundle")
    assert res.manifest["shipped"] == "fp32"
    yield res.out


@pytest.fixture(scope="module")
def pi_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(wheels folder, site folder): the rpi wheels, installed for aarch64 from them alone."""
    from toma_edge.host.wheels import write_wheels

    root = tmp_path_factory.mktemp("pi")
    ws = write_wheels("rpi", root / "wheels")
    assert ws.arch == "aarch64" and ws.python == "3.11"
    names = [w.name for w in ws.wheels]
    assert any(n.startswith("toma_edge_native-") and n.endswith("linux_aarch64.whl") for n in names)
    assert not any(n.split("-")[0].lower() in ("torch", "executorch", "pandas") for n in names)
    site = root / "site"
    # pip installs for the Pi's platform into a folder, from exactly those files
    from toma_edge.host.wheels import _platforms

    plat = [a for p in _platforms("aarch64", "2.36") for a in ("--platform", p)]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-index", "--find-links", str(ws.out), "--target", str(site),
         "--only-binary=:all:", *plat, "--python-version", "311", "--implementation", "cp",
         "--abi", "cp311", "toma-edge"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (site / "toma_edge_native").is_dir() and not (site / "torch").exists()
    yield ws.out, site


EMULATED = textwrap.dedent("""
    import json, platform, sys
    from toma_edge.cli import main
    jobs = json.loads(sys.argv[1])
    for bundle, x, out in jobs:
        try:
            main(["run", bundle, "-i", x, "-o", out], standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise
    from toma_edge.device.adapter import available_adapters
    print(json.dumps({"machine": platform.machine(), "torch": "torch" in sys.modules,
                      "adapters": available_adapters()}))
""")


def _run_emulated(site: Path, jobs: list[list[str]], cwd: Path) -> str:
    """`toma-edge run` for each (bundle, input, output) job in one emulated aarch64
    process with the Pi's install on its path; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TOMA_EDGE_ADAPTER"))}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run(["bash", str(REPO / "scripts" / "aarch64_python.sh"), "-c", EMULATED,
                        json.dumps(jobs)], capture_output=True, text=True, timeout=900, env=env,
                       cwd=cwd)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r.stdout


def test_bundles_built_here_run_on_aarch64(pi_site: tuple[Path, Path], example_bundle: Path,
                                          fp32_bundle: Path, tmp_path: Path) -> None:
    _, site = pi_site
    jobs, want = [], {}
    for name, bundle in (("int8", example_bundle), ("fp32", fp32_bundle)):
        width = json.loads((bundle / "manifest.json").read_text())["inputs"][0]["shape"][1]
        x = np.random.default_rng(11).standard_normal((300, width)).astype(np.float32)
        np.save(tmp_path / f"{name}-x.npy", x)
        # the host's predictions: the x86_64 install, through the torch-based pybindings
        r = subprocess.run([sys.executable, "-m", "toma_edge.cli", "run", str(bundle), "-i",
                            str(tmp_path / f"{name}-x.npy"), "-o", str(tmp_path / f"{name}-host.npy")],
                           capture_output=True, text=True, timeout=300, cwd=REPO,
                           env=dict(os.environ, TOMA_EDGE_ADAPTER="pybind"))
        assert r.returncode == 0, r.stderr[-2000:]
        want[name] = np.load(tmp_path / f"{name}-host.npy")
        jobs.append([str(bundle), str(tmp_path / f"{name}-x.npy"), str(tmp_path / f"{name}-pi.npy")])

    info = json.loads(_run_emulated(site, jobs, tmp_path).strip().splitlines()[-1])
    assert info == {"machine": "aarch64", "torch": False, "adapters": ["native"]}
    got = {name: np.load(tmp_path / f"{name}-pi.npy") for name in want}
    np.testing.assert_array_equal(got["int8"], want["int8"])  # int8: bit-exact
    np.testing.assert_allclose(got["fp32"], want["fp32"], rtol=1e-5, atol=1e-5)
    assert got["fp32"].shape == want["fp32"].shape == (300, 10)


@pytest.fixture(scope="module")
def zoo_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """Two zoo models users bring, trained briefly in our own loop and bundled with
    package(): a MobileNetV3-style classifier (depthwise, SE, hardswish, residual adds;
    int8) and an LSTM classifier (a fixed-batch export the runtime pads)."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import zoo_models

    from toma_edge.host import package

    root = tmp_path_factory.mktemp("zoo-aarch64")
    out: dict[str, tuple[Path, Any]] = {}
    for name, quantize in (("mnv3", "int8"), ("lstm", "fp32")):
        entry = zoo_models.ZOO[name]
        X, y, Xt, yt = entry.data("tiny")
        model = entry.model("tiny")
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _epoch in range(4):
            for i in range(0, len(X), 32):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(torch.as_tensor(X[i:i + 32])),
                                                         torch.as_tensor(y[i:i + 32]))
                loss.backward()
                opt.step()
        model.eval()
        res = package(model, X[:4], calibration=X[:256], evaluation=(Xt, yt), target="rpi",
                      out=root / name, quantize=quantize, max_batch=64, name=f"zoo-{name}")
        assert res.manifest["shipped"] == quantize
        out[name] = (res.out, model)
    return out


def test_zoo_models_agree_with_eager_on_aarch64(pi_site: tuple[Path, Path], zoo_bundles,
                                               tmp_path: Path) -> None:
    """The same agreement as on the host: the aarch64 program's top-1 class against the
    eager model's on fresh rows, >= 97%."""
    import torch
    import zoo_models

    _, site = pi_site
    jobs, want = [], {}
    for name, (bundle, model) in zoo_bundles.items():
        x, _ = zoo_models.ZOO[name].rows_of("tiny", 150, seed=99)  # fresh rows
        np.save(tmp_path / f"{name}-x.npy", x)
        with torch.no_grad():
            want[name] = model(torch.as_tensor(x)).numpy().argmax(1)
        jobs.append([str(bundle), str(tmp_path / f"{name}-x.npy"), str(tmp_path / f"{name}-pi.npy")])
    _run_emulated(site, jobs, tmp_path)
    for name, top1 in want.items():
        got = np.load(tmp_path / f"{name}-pi.npy")
        assert got.shape[0] == 150
        agree = float((got.argmax(1) == top1).mean())
        print(f"{name}: aarch64 top-1 agreement with eager {agree:.3f}")
        assert agree >= 0.97, (name, agree)
    man = json.loads((zoo_bundles["lstm"][0] / "manifest.json").read_text())
    assert man["export_batch"] == 32  # the fixed batch padded on the Pi too
