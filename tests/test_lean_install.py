"""The plain install is the device's: no torch, no executorch package, same predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_service_http import ServiceProc

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lean_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with `pip install toma-edge` (no extras) from this tree; the
    toma-edge-native wheel is built from device/native."""
    root = tmp_path_factory.mktemp("lean")
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO / "device" / "native")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # a regular (non-editable) install from a copy-free path: what a user's pip does
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--find-links", str(wheels), str(REPO)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    yield py


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return env


def test_plain_install_has_no_torch_or_executorch(lean_python: Path) -> None:
    r = subprocess.run([str(lean_python), "-m", "pip", "list", "--format", "json"],
                       capture_output=True, text=True, timeout=120, check=True)
    names = {p["name"].lower() for p in json.loads(r.stdout)}
    assert {"toma-edge", "toma-edge-native", "numpy"} <= names
    assert not names & {"torch", "executorch", "torchao", "pandas", "matplotlib", "scikit-learn"}, names
    # the host commands say what to install instead of a traceback
    r = subprocess.run([str(lean_python), "-m", "toma_edge.cli", "build", "--target", "rpi",
                        "--out", str(lean_python.parent.parent / "never")],
                       capture_output=True, text=True, timeout=120, env=_env(), cwd="/")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: this command needs the host install (training, compression, export): "
        "pip install 'toma-edge[host]' (missing module 'torch')"]


def _host_predictions(bundle: Path, x: np.ndarray, tmp: Path) -> np.ndarray:
    """The host-side install's `toma-edge run`, through the torch-based pybindings."""
    np.save(tmp / "x.npy", x)
    r = subprocess.run([sys.executable, "-m", "toma_edge.cli", "run", str(bundle), "-i",
                        str(tmp / "x.npy"), "-o", str(tmp / "host.npy")],
                       capture_output=True, text=True, timeout=300,
                       env={**_env(), "TOMA_EDGE_ADAPTER": "pybind"}, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(tmp / "host.npy")


@pytest.mark.parametrize("which", ["example_bundle", "digits_bundle"])
def test_lean_run_and_serve_match_the_host(lean_python: Path, which: str, tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    bundle: Path = request.getfixturevalue(which)
    width = json.loads((bundle / "manifest.json").read_text())["inputs"][0]["shape"][1]
    x = np.random.default_rng(7).standard_normal((300, width)).astype(np.float32)
    want = _host_predictions(bundle, x, tmp_path)

    # run, from / so nothing of the source tree can be imported by accident
    for fmt in ("npy", "csv"):
        src = tmp_path / f"in.{fmt}"
        if fmt == "csv":
            np.savetxt(src, x, delimiter=",", fmt="%.9g")
        else:
            np.save(src, x)
        out = tmp_path / f"lean.{fmt}"
        r = subprocess.run([str(lean_python), "-m", "toma_edge.cli", "run", str(bundle), "-i",
                            str(src), "-o", str(out)], capture_output=True, text=True,
                           timeout=300, env=_env(), cwd="/")
        assert r.returncode == 0, r.stderr[-2000:]
        if fmt == "npy":
            np.testing.assert_array_equal(np.load(out).reshape(want.shape), want)
        else:  # y0..yN (then the class label for a classifier), float32 round-trip digits
            n = want.reshape(len(x), -1).shape[1]
            got = np.loadtxt(out, delimiter=",", ndmin=2, dtype=np.float32, usecols=range(n))
            np.testing.assert_array_equal(got, want.reshape(len(x), -1))

    # serve: same answers over HTTP, from the native adapter, without torch
    svc = ServiceProc(tmp_path / "serve.log", args=[str(bundle)], python=str(lean_python),
                      env=_env())
    try:
        health = svc.health()
        assert health["model"]["adapter"] == "native"
        for a, b in ((0, 1), (1, 40), (40, 300)):
            status, body = svc.predict(x[a:b].tolist())
            assert status == 200, body
            got = np.asarray(body["outputs"], np.float32).reshape(b - a, -1)
            np.testing.assert_array_equal(got, want[a:b].reshape(b - a, -1))
        rss = psutil.Process(svc.proc.pid).memory_info().rss
        assert rss < 200 << 20, f"lean service RSS {rss >> 20} MiB"  # the torch path is ~260 MiB
    finally:
        assert svc.stop() == 0, svc.tail()
    assert "torch" not in svc.tail()

