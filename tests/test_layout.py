"""The package layout docs/architecture.md describes: symlinks, import names, the device/host
direction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_symlinks_are_relative() -> None:
    assert os.readlink(REPO / "toma_edge" / "host") == "../host"
    assert os.readlink(REPO / "toma_edge" / "device") == "../device"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_device_never_pulls_in_host() -> None:
    p = _run(
        "import toma_edge.device, toma_edge.device.adapter, toma_edge.device.measure, sys\n"
        "import importlib, pkgutil\n"
        "for m in pkgutil.iter_modules(toma_edge.device.__path__):\n"
        "    importlib.import_module('toma_edge.device.' + m.name)\n"
        "bad = [n for n in sys.modules if n.startswith('toma_edge.host') or n.startswith('executorch.exir')]\n"
        "assert not bad, bad\n"
    )
    assert p.returncode == 0, p.stderr[-2000:]


def test_core_import_is_lean() -> None:
    p = _run("import toma_edge, sys\nassert 'torch' not in sys.modules\n")
    assert p.returncode == 0, p.stderr[-2000:]


def test_stray_bare_import_fails_loudly() -> None:
    p = _run("import host")
    assert p.returncode != 0 and "toma_edge.host" in p.stderr
    p = _run("import device")
    assert p.returncode != 0 and "toma_edge.device" in p.stderr
