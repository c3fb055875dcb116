"""Bundle checks shared by host and device: hashes, versions, signatures, archives.

    from toma_edge.bundle import verify_bundle
    vb = verify_bundle("dist/rpi4", trust_key="fleet.pub")   # BundleError says which check failed
    vb.manifest.name, vb.signed, vb.model_path

No torch here: a device may have none.
"""

from __future__ import annotations

import base64
import os
import shutil
import tarfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import BundleError, ConfigError
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, read_manifest, sha256_file

__all__ = [
    "VerifiedBundle",
    "verify_bundle",
    "sign_manifest",
    "runtime_executorch_version",
    "extract_archive",
    "make_archive",
]


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


def runtime_executorch_version() -> str | None:
    """The executorch release this device runs, or None where none is installed.

    That of the native adapter's runtime libraries where it is installed (and not
    overridden by ``TOMA_EDGE_ADAPTER=pybind``), else the executorch package's.
    """
    override = os.environ.get("TOMA_EDGE_RUNTIME_EXECUTORCH")
    if override:
        return override
    from .device.adapter import available_adapters, native_executorch_version

    if available_adapters()[:1] == ["native"]:
        v = native_executorch_version()
        if v:
            return v
    try:
        return metadata.version("executorch")
    except metadata.PackageNotFoundError:
        return None


def _major_minor(v: str) -> tuple[str, ...]:
    return tuple(v.split("+")[0].split(".")[:2])


def _load_public_key(path: str | Path):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a PEM public key (SubjectPublicKeyInfo, Ed25519): {e}") from e
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
        raise ConfigError(f"{key_path}: not an unencrypted PEM private key (PKCS#8, Ed25519): {e}") from e
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
    check_runtime_version: bool = True,
) -> VerifiedBundle:
    """Check a bundle folder: manifest schema, signature, every file's sha256 and size,
    and the ExecuTorch major.minor against this runtime's. Raises BundleError naming
    the check that failed."""
    d = Path(path)
    if not d.is_dir():
        raise BundleError(f"{d}: not a bundle folder (expected a folder with manifest.json and model.pte)")
    mpath = d / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{d}: no manifest.json; this is not a toma-edge bundle")
    raw = mpath.read_bytes()
    import hashlib

    manifest_sha = hashlib.sha256(raw).hexdigest()
    signed = (d / SIGNATURE_NAME).is_file()
    if trust_key is not None:
        if not signed:
            raise BundleError(f"{d}: bundle is unsigned (no manifest.sig) but --trust-key requires a signature")
        from cryptography.exceptions import InvalidSignature

        key = _load_public_key(trust_key)
        try:
            sig = base64.b64decode((d / SIGNATURE_NAME).read_text().strip(), validate=True)
            key.verify(sig, raw)
        except (InvalidSignature, ValueError) as e:
            raise BundleError(
                f"{d}: signature check failed: manifest.sig does not match manifest.json "
                f"under trust key {trust_key}"
            ) from e
    manifest = read_manifest(mpath)
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
                f"{d}: {name} is {size} bytes, manifest says {entry.bytes} (truncated or replaced); "
                "rebuild or copy the bundle again"
            )
        if sha256_file(f) != entry.sha256:
            raise BundleError(f"{d}: sha256 mismatch for {name} (tampered or corrupt); rebuild with `toma-edge build`")
    if check_runtime_version:
        built = manifest.versions.get("executorch")
        have = runtime_executorch_version()
        if built is None:
            raise BundleError(f"{d}: manifest does not say which executorch built it")
        if have is not None and _major_minor(built) != _major_minor(have):
            raise BundleError(
                f"{d}: built with executorch {built} but this runtime is {have}; "
                f"rebuild the bundle with executorch {'.'.join(_major_minor(have))}.x"
            )
    return VerifiedBundle(path=d, manifest=manifest, signed=signed, manifest_sha256=manifest_sha)


def make_archive(bundle_dir: str | Path, out: str | Path) -> Path:
    """Write a ``.tar.gz`` of a bundle folder (its files at the archive's top level)."""
    d = Path(bundle_dir)
    out = Path(out)
    with tarfile.open(out, "w:gz") as tar:
        for f in sorted(d.iterdir()):
            if f.is_file():
                tar.add(f, arcname=f.name)
    return out


def extract_archive(archive: str | Path, dest: str | Path, *, max_bytes: int = 1 << 30) -> Path:
    """Safely unpack a bundle ``.tar.gz`` (regular files only, no paths outside ``dest``)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            total = 0
            members = []
            for m in tar.getmembers():
                if m.isdir():
                    continue
                if not m.isfile():
                    raise BundleError(f"{archive}: archive holds {m.name}, which is not a regular file")
                total += m.size
                if total > max_bytes:
                    raise BundleError(f"{archive}: archive unpacks to more than {max_bytes} bytes")
                members.append(m)
            names = [Path(m.name) for m in members]
            # an archive of a folder (dir/manifest.json) or of its files (manifest.json)
            prefix = names[0].parts[0] if names and all(len(n.parts) == 2 and n.parts[0] == names[0].parts[0] for n in names) else None
            for m, n in zip(members, names):
                rel = Path(*n.parts[1:]) if prefix else n
                if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
                    raise BundleError(f"{archive}: archive member {m.name} is not a plain bundle file")
                src = tar.extractfile(m)
                if src is None:
                    raise BundleError(f"{archive}: cannot read {m.name}")
                with open(dest / rel.name, "wb") as f:
                    shutil.copyfileobj(src, f)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"{archive}: not a readable .tar.gz bundle archive: {e}") from e
    return dest
