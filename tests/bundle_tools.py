"""Bundle copies for tests and benches: another version, or a tampered model.

    v2 = with_version(bundle, tmp / "v2", "v2")     # same model, new manifest version
    bad = corrupt(bundle, tmp / "bad")              # model.pte with one byte flipped
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["with_version", "corrupt", "flip_byte"]


def with_version(src: Path, dst: Path, version: str) -> Path:
    """A copy of a bundle under another version (a new manifest, same model); replaces
    ``dst`` if it exists. The copy's hashes no longer need to match: only the manifest
    changed, and it is not hashed in itself."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    p = dst / "manifest.json"
    m = json.loads(p.read_text())
    m["version"] = version
    p.write_text(json.dumps(m, indent=2) + "\n")
    return dst


def flip_byte(path: Path) -> Path:
    """Flip one byte in the middle of a file (a sha256 mismatch, same size)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def corrupt(src: Path, dst: Path) -> Path:
    """A copy of a bundle whose model.pte has one byte flipped."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    flip_byte(dst / "model.pte")
    return dst
