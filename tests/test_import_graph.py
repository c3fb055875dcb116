"""The layers hold on the import graph (scripts/import_graph.py, read with ast): no module
cycles, no private name imported across modules, no core module importing host or device
(and no device module importing the host)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "import_graph.py"


@pytest.fixture(scope="module")
def graph() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_the_package_has_no_cycles_private_imports_or_layer_breaks(graph: ModuleType) -> None:
    r = graph.report()
    assert r["cycles"] == [], r["cycles"]
    assert r["private_imports"] == [], r["private_imports"]
    assert r["layer_violations"] == [], r["layer_violations"]
    assert r["modules"] > 40  # it saw the package, not an empty tree


def test_it_finds_each_kind_of_violation(graph: ModuleType, tmp_path: Path) -> None:
    core, host, device = tmp_path / "core", tmp_path / "host", tmp_path / "device"
    for d in (core, host, device):
        d.mkdir()
        (d / "__init__.py").write_text("")
    (core / "a.py").write_text("from .b import helper\n")
    (core / "b.py").write_text("from . import a\n\ndef helper():\n    from .c import _secret\n")
    (core / "c.py").write_text("_secret = 1\nfrom .host import build\n")
    (core / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                               "    from .e import E\n")
    (core / "e.py").write_text("from .d import x\n")  # a cycle only through TYPE_CHECKING
    (device / "run.py").write_text("from ..host import train\n")
    (host / "build.py").write_text("from ..device import run\n")
    r = graph.report({"toma_edge": core, "toma_edge.host": host, "toma_edge.device": device})
    assert r["cycles"] == [["toma_edge.a", "toma_edge.b"]]
    assert [p.split(" (")[0] for p in r["private_imports"]] == [
        "toma_edge.b imports _secret from toma_edge.c"]
    assert r["layer_violations"] == ["toma_edge.c -> toma_edge.host.build",
                                     "toma_edge.device.run -> toma_edge.host"]
    assert r["host_device_edges"] == ["toma_edge.host.build -> toma_edge.device.run"]
    assert r["type_checking_edges"] == ["toma_edge.d -> toma_edge.e"]


def test_the_command_prints_the_counts() -> None:
    p = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                       timeout=120)
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("cycles ") and "private imports" in last, p.stdout[-2000:]
    assert p.returncode == (0 if last.startswith("cycles 0, private imports 0, layer edges"
                                                 " (core->host/device, device->host) 0")
                            else 1)
