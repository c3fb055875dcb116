"""Bundle checks: manifest, every file's hash and size, signature, executorch version.

    from toma_edge.bundle import verify_bundle
    vb = verify_bundle("dist/rpi4", trust_key="fleet.pub")   # BundleError says which check failed
    vb.manifest.name, vb.signed, vb.model_path

The runtime's executorch version is the device's to know: ``toma_edge.device.bundle``
passes it in (``runtime_executorch=``). No torch here: a device may have none.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError, ConfigError
from .manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    Manifest,
    parse_manifest,
    read_limited,
    sha256_file,
)

__all__ = ["VerifiedBundle", "verify_bundle", "sign_manifest", "major_minor"]


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle folder whose manifest, hashes (and signature, if asked) were checked."""

    path: Path
    manifest: Manifest
    signed: bool
    manifest_sha256: str

    @property
    def model_path(self) -> Path:
        return self.path / "model.pte"


def major_minor(v: str) -> tuple[str, ...]:
    return tuple(v.split("+")[0].split(".")[:2])


def _load_public_key(path: str | Path):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a PEM public key (SubjectPublicKeyInfo, Ed25519): "
                          f"{e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: trust key must be an Ed25519 public key")
    return key


def sign_manifest(bundle_dir: str | Path, key_path: str | Path) -> Path:
    """Write ``manifest.sig``: base64 of the Ed25519 signature of manifest.json's bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{key_path}: not an unencrypted PEM private key "
                          f"(PKCS#8, Ed25519): {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{key_path}: signing key must be an Ed25519 private key")
    d = Path(bundle_dir)
    sig = key.sign((d / MANIFEST_NAME).read_bytes())
    out = d / SIGNATURE_NAME
    out.write_text(base64.b64encode(sig).decode() + "\n")
    return out


def verify_bundle(
    path: str | Path,
    *,
    trust_key: str | Path | None = None,
    runtime_executorch: str | None = None,
    check_runtime_version: bool = True,
) -> VerifiedBundle:
    """Check a bundle folder: manifest schema, signature, every file's sha256 and size,
    and (``check_runtime_version``) that the manifest names the executorch that built it,
    whose major.minor must equal ``runtime_executorch`` when given: the device passes its
    own (:func:`toma_edge.device.bundle.runtime_executorch_version`). Raises BundleError
    naming the check that failed."""
    d = Path(path)
    if not d.is_dir():
        raise BundleError(f"{d}: not a bundle folder "
                          "(expected a folder with manifest.json and model.pte)")
    mpath = d / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{d}: no manifest.json; this is not a toma-edge bundle")
    raw = read_limited(mpath, MAX_MANIFEST_BYTES, what="manifest")
    manifest_sha = hashlib.sha256(raw).hexdigest()
    signed = (d / SIGNATURE_NAME).is_file()
    if trust_key is not None:
        if not signed:
            raise BundleError(f"{d}: bundle is unsigned (no manifest.sig) "
                              "but --trust-key requires a signature")
        from cryptography.exceptions import InvalidSignature

        key = _load_public_key(trust_key)
        try:
            sig = base64.b64decode(read_limited(d / SIGNATURE_NAME, 4096, what="manifest.sig")
                                   .strip(), validate=True)
            key.verify(sig, raw)
        except (InvalidSignature, ValueError) as e:
            raise BundleError(
                f"{d}: signature check failed: manifest.sig does not match manifest.json "
                f"under trust key {trust_key}"
            ) from e
    manifest = parse_manifest(raw, where=str(mpath))  # the bytes the signature covers
    if "model.pte" not in manifest.files:
        raise BundleError(f"{d}: manifest lists no model.pte")
    for name, entry in manifest.files.items():
        f = d / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{d}: manifest names a file outside the bundle: {name}")
        if not f.is_file():
            raise BundleError(f"{d}: {name} is missing; the bundle is incomplete")
        size = f.stat().st_size
        if size != entry.bytes:
            raise BundleError(
                f"{d}: {name} is {size} bytes, manifest says {entry.bytes} "
                "(truncated or replaced); "
                "rebuild or copy the bundle again"
            )
        if sha256_file(f) != entry.sha256:
            raise BundleError(f"{d}: sha256 mismatch for {name} (tampered or corrupt); "
                              "rebuild with `toma-edge build`")
    if check_runtime_version:
        built = manifest.versions.get("executorch")
        have = runtime_executorch
        if built is None:
            raise BundleError(f"{d}: manifest does not say which executorch built it")
        if have is not None and major_minor(built) != major_minor(have):
            raise BundleError(
                f"{d}: built with executorch {built} but this runtime is {have}; "
                f"rebuild the bundle with executorch {'.'.join(major_minor(have))}.x"
            )
    return VerifiedBundle(path=d, manifest=manifest, signed=signed, manifest_sha256=manifest_sha)


