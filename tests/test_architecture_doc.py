"""docs/architecture.md stays true, and the project points nowhere outside itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from toma_edge.bundle import Manifest
from toma_edge.cli import main
from toma_edge.telemetry import EventMessage, StatusMessage, TelemetryMessage

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg", ".txt", ".ini", ""}
# the contracts once lived in a design file outside the repository; spelt in parts so that
# this file does not match itself
OUTSIDE = ("DESIGN" + ".md", "/work" + "/", "helpers/" + "ROLLOUT")


def test_every_path_the_doc_names_exists() -> None:
    text = DOC.read_text()
    paths = set(re.findall(r"`((?:toma_edge|host|device|scripts|tests|docs|firmware_configs)"
                           r"/[A-Za-z0-9_./-]*)`", text))
    assert len(paths) > 20
    missing = sorted(p for p in paths if not (REPO / p.rstrip("/")).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_command_and_manifest_key_is_in_the_doc() -> None:
    text = DOC.read_text()
    commands = [f"toma-edge {n}" for n in main.commands if n != "fleet"]
    fleet = main.commands["fleet"]
    commands += [f"{n}" for n in fleet.commands]  # type: ignore[attr-defined]
    assert not [c for c in commands if c not in text]
    keys = list(Manifest.model_fields)
    assert not [k for k in keys if f"`{k}`" not in text], "manifest keys missing"
    for model in (StatusMessage, TelemetryMessage, EventMessage):
        fields = [f for f in model.model_fields if f != "v"]
        missing = [f for f in fields if f not in text]
        assert not missing, f"{model.__name__} fields missing from the doc: {missing}"


def _project_files() -> list[Path]:
    """The repository's files (git's list; else a walk that skips build outputs)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return [REPO / line for line in out.splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        skip = {"build", "dist", "__pycache__", ".git", ".hypothesis"}
        return [p for p in REPO.rglob("*") if not skip & set(p.relative_to(REPO).parts)]


def test_nothing_refers_to_files_outside_the_repository() -> None:
    hits = []
    for path in _project_files():
        rel = path.relative_to(REPO)
        if path.is_symlink() or not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            continue
        text = path.read_text(errors="replace")
        hits += [f"{rel}: {o}" for o in OUTSIDE if o in text]
    assert not hits, hits
