"""Device bundle loading: every check refuses a bad bundle and names itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_tools import flip_byte
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from toma_edge.bundle import make_archive, sha256_file, sign_manifest
from toma_edge.device.bundle import load_bundle
from toma_edge.errors import BundleError


def _keypair(d: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    priv, pub = d / f"{name}.pem", d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _edit_manifest(bundle: Path, **changes: object) -> None:
    p = bundle / "manifest.json"
    m = json.loads(p.read_text())
    m.update(changes)
    p.write_text(json.dumps(m, indent=2) + "\n")


def test_loads_and_runs(example_bundle: Path) -> None:
    b = load_bundle(example_bundle, threads=1)
    assert b.manifest.name == "seed-regression" and not b.signed
    from toma_edge.device.adapter import available_adapters

    assert b.adapter == available_adapters()[0]  # the best installed: native, else pybind
    (y,) = b.program.run([np.full((3, 10), 0.5, np.float32)])
    assert y.shape == (3, 1) and abs(float(y[0, 0]) - 5.0) < 0.5


def test_archive(example_bundle: Path, tmp_path: Path) -> None:
    arch = make_archive(example_bundle, tmp_path / "b.tar.gz")
    b = load_bundle(arch, threads=1)
    (y,) = b.program.run([np.zeros((2, 10), np.float32)])
    assert y.shape == (2, 1)


def test_tampered_model(example_bundle: Path, copy_bundle) -> None:  # type: ignore[no-untyped-def]
    d = copy_bundle(example_bundle)
    flip_byte(d / "model.pte")
    with pytest.raises(BundleError, match="sha256 mismatch for model.pte"):
        load_bundle(d)


def test_truncated_model(example_bundle: Path, copy_bundle) -> None:  # type: ignore[no-untyped-def]
    d = copy_bundle(example_bundle)
    data = (d / "model.pte").read_bytes()
    (d / "model.pte").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(d)


def test_wrong_schema_version(example_bundle: Path, copy_bundle) -> None:  # type: ignore[no-untyped-def]
    d = copy_bundle(example_bundle)
    _edit_manifest(d, schema_version=99)
    with pytest.raises(BundleError, match="schema_version 99"):
        load_bundle(d)


def test_executorch_mismatch(example_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOMA_EDGE_RUNTIME_EXECUTORCH", "1.4.2")
    with pytest.raises(BundleError, match=r"built with executorch 1\.5\.\d+ but this runtime is 1\.4\.2"):
        load_bundle(example_bundle)
    monkeypatch.setenv("TOMA_EDGE_RUNTIME_EXECUTORCH", "1.5.9")  # patch releases are fine
    load_bundle(example_bundle, threads=1)


def test_signatures(example_bundle: Path, copy_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    priv, pub = _keypair(tmp_path, "fleet")
    _, other_pub = _keypair(tmp_path, "other")
    d = copy_bundle(example_bundle)
    with pytest.raises(BundleError, match="unsigned"):
        load_bundle(d, trust_key=pub)
    sign_manifest(d, priv)
    assert load_bundle(d, trust_key=pub, threads=1).signed
    with pytest.raises(BundleError, match="signature check failed"):
        load_bundle(d, trust_key=other_pub)
    # an attacker replaces the model and rewrites the manifest's hash and size to match
    flip_byte(d / "model.pte")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["model.pte"] = {"sha256": sha256_file(d / "model.pte"), "bytes": (d / "model.pte").stat().st_size}
    (d / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    with pytest.raises(BundleError, match="signature check failed"):
        load_bundle(d, trust_key=pub)


def test_device_imports_stay_lean() -> None:
    code = (
        "import sys, toma_edge.device.predictor, toma_edge.device.loaders, toma_edge.device.runner\n"
        "bad = [m for m in sys.modules if m.startswith(('toma_edge.host', 'executorch.exir', "
        "'executorch.runtime'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
