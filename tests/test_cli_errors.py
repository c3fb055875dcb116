"""The CLI: --help/--version everywhere; bad input gets one line, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from bundle_tools import flip_byte
from click.testing import CliRunner

from toma_edge.cli import main


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _all_commands(cmd, (*prefix, name))
    return out


def test_version_and_help_on_every_command() -> None:
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "0.1.0" in r.output
    cmds = _all_commands(main)
    assert {("targets",), ("build",), ("inspect",)} <= set(cmds)
    for c in cmds:
        r = CliRunner().invoke(main, [*c, "--help"])
        assert r.exit_code == 0, (c, r.output)
        assert "Usage:" in r.output


def _project(tmp_path: Path, body: str, files: dict[str, str] | None = None) -> Path:
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    p = tmp_path / "toma-edge.yaml"
    p.write_text(body)
    return p


TINY_MODEL = "import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))\n"
TINY_DATA = (
    "import numpy as np\n"
    "def load():\n"
    "    r = np.random.default_rng(0); X = r.random((64, 4), dtype=np.float32); y = X.sum(1)\n"
    "    return X[:48], y[:48], X[48:], y[48:]\n"
)
TINY = "name: tiny\ntask: regression\nmodel: tiny_model:build\ndata: tiny_data:load\ntrain: {epochs: 1, folds: 0}\n"


def _invoke(args: list[str]) -> click.testing.Result:
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize(
    ("body", "files", "expect"),
    [
        (None, None, "project file not found"),
        ("name: [unclosed\n", None, "not valid YAML"),
        ("- just\n- a list\n", None, "must be a YAML mapping"),
        ("name: x\ntask: regression\nmodel: nomodule:build\ndata: tiny_data:load\n", {"tiny_data.py": TINY_DATA}, "cannot import module 'nomodule'"),
        ("name: x\ntask: regression\nmodel: tiny_model:nothere\ndata: tiny_data:load\n", {"tiny_model.py": TINY_MODEL, "tiny_data.py": TINY_DATA}, "has no callable 'nothere'"),
        ("name: x\ntask: regress\nmodel: a:b\ndata: c:d\n", None, "field 'task'"),
        ("name: x\ntask: regression\nmodel: notacallable\ndata: c:d\n", None, "must be module:callable"),
        ("name: x\ntask: regression\nmodel: a:b\ndata: c:d\ntrain: {epochz: 3}\n", None, "unknown key"),
        (TINY, {"tiny_model.py": TINY_MODEL.replace("Linear(4, 8)", "Linear(5, 8)"), "tiny_data.py": TINY_DATA}, "cannot take data rows of shape (4,)"),
        (TINY, {"tiny_model.py": TINY_MODEL, "tiny_data.py": TINY_DATA.replace("return X[:48], y[:48], X[48:], y[48:]", "return X[:48], y[:40], X[48:], y[48:]")}, "X_train has 48 rows but y_train has 40"),
        (TINY, {"tiny_model.py": TINY_MODEL, "tiny_data.py": TINY_DATA.replace("return X[:48]", "return X[:48, :3]")}, "X_test rows have shape (4,) but X_train rows (3,)"),
        (TINY, {"tiny_model.py": TINY_MODEL, "tiny_data.py": "def load():\n    return 1\n"}, "must return (X_train, y_train, X_test, y_test)"),
    ],
)
def test_bad_project_is_one_line_exit_2(tmp_path: Path, body: str | None, files: dict[str, str] | None, expect: str) -> None:
    proj = tmp_path / "missing.yaml" if body is None else _project(tmp_path, body, files)
    out = tmp_path / "out"
    r = _invoke(["build", "--target", "rpi", "--project", str(proj), "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], r.output
    assert "Traceback" not in r.output
    assert not out.exists()


def test_unknown_target_exit_2() -> None:
    r = _invoke(["build", "--target", "rpi9"])
    assert r.exit_code == 2
    assert "unknown target 'rpi9'" in r.output and "rpi4" in r.output


def test_model_that_cannot_fit_writes_nothing(tmp_path: Path) -> None:
    proj = _project(tmp_path, TINY, {"tiny_model.py": TINY_MODEL, "tiny_data.py": TINY_DATA})
    out = tmp_path / "out"
    r = _invoke(["build", "--target", "rpi-zero-2w", "--project", str(proj), "--out", str(out),
                 "--storage-budget", "1KiB"])
    assert r.exit_code == 2, r.output
    assert "storage budget" in r.output and "Traceback" not in r.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "toma_edge.cli", "inspect", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_inspect_verifies_hashes(example_bundle: Path, copy_bundle) -> None:  # type: ignore[no-untyped-def]
    r = _invoke(["inspect", str(example_bundle)])
    assert r.exit_code == 0, r.output
    assert "seed-regression" in r.output and "sha256 ok" in r.output and "int8" in r.output
    bad = copy_bundle(example_bundle)
    flip_byte(bad / "model.pte")
    r = _invoke(["inspect", str(bad)])
    assert r.exit_code == 2 and "sha256 mismatch for model.pte" in r.output


def test_tiny_project_without_cross_validation_builds(tmp_path: Path) -> None:
    proj = _project(tmp_path, TINY, {"tiny_model.py": TINY_MODEL, "tiny_data.py": TINY_DATA})
    out = tmp_path / "out"
    r = _invoke(["build", "--target", "rpi", "--project", str(proj), "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["build"]["data"]["train_rows"] == 48
    assert "cv_r2" not in m["metrics"]["shipped"] and "test_r2" in m["metrics"]["shipped"]


def test_impossible_latency_budget_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    proj = _project(tmp_path, TINY, {"tiny_model.py": TINY_MODEL, "tiny_data.py": TINY_DATA})
    out = tmp_path / "out"
    r = _invoke(["build", "--target", "rpi", "--project", str(proj), "--out", str(out),
                 "--latency-budget", "0.000001"])
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "latency" in err[0], r.output
    assert not out.exists()


def test_unset_export_and_quantize_come_from_the_target() -> None:
    from toma_edge import load_profile
    from toma_edge.host.source import builtin_project, with_target_defaults
    from toma_edge.project import load_project

    zero = load_profile("rpi-zero-2w")
    p = with_target_defaults(builtin_project(), zero)
    assert (p.export.max_batch, p.compress.quantize) == (zero.export.max_batch, "int8")
    assert with_target_defaults(builtin_project(), load_profile("rpi")).export.max_batch == 256
    # what a project file sets stays as it is
    digits = load_project(Path(__file__).parent.parent / "examples" / "digits" / "toma-edge.yaml")
    assert with_target_defaults(digits, zero).export.max_batch == 128
