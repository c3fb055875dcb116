"""Bundle checks shared by host and device: hashes, versions, signatures, archives.

    from toma_edge.bundle import verify_bundle
    vb = verify_bundle("dist/rpi4", trust_key="fleet.pub")   # BundleError says which check failed
    vb.manifest.name, vb.signed, vb.model_path

Archives are an input surface (``run``/``serve`` on a ``.tar.gz``, ``POST /v1/model``):
:func:`extract_archive` caps the member count, the unpacked size and the compression
ratio from the tar headers before anything is written, and bounds every read while it
streams, so a zip bomb or a 300,000-member archive is refused in milliseconds:

    from toma_edge.bundle import archive_limits, extract_archive
    extract_archive("up.tar.gz", "tmp/up", **archive_limits(512 << 20))  # caps from a budget

No torch here: a device may have none.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import lzma
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TypedDict

from .errors import BundleError, ConfigError
from .manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    Manifest,
    parse_manifest,
    read_limited,
    sha256_file,
)

__all__ = [
    "VerifiedBundle",
    "verify_bundle",
    "sign_manifest",
    "runtime_executorch_version",
    "extract_archive",
    "make_archive",
    "ArchiveLimits",
    "archive_limits",
    "MAX_MEMBERS",
    "MAX_RATIO",
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
    raw = read_limited(mpath, MAX_MANIFEST_BYTES, what="manifest")
    import hashlib

    manifest_sha = hashlib.sha256(raw).hexdigest()
    signed = (d / SIGNATURE_NAME).is_file()
    if trust_key is not None:
        if not signed:
            raise BundleError(f"{d}: bundle is unsigned (no manifest.sig) but --trust-key requires a signature")
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


MAX_MEMBERS = 64
"""Most members (files and folders) a bundle archive may hold; a bundle has a handful."""

MAX_RATIO = 100
"""Most a bundle archive may unpack to, as a multiple of its own size (plus
:data:`_RATIO_SLACK`). Real bundles unpack to ~1.5x (model.pte hardly compresses); a
heavily pruned fp32 model stays far below 100x; gzip's ceiling (a zero bomb) is ~1000x."""

_RATIO_SLACK = 1 << 20  # tiny archives: tar headers and record padding (zeros) compress ~100x
_META_READ = 64 << 10  # largest single read of tar metadata (pax / GNU long-name headers)
_COPY_CHUNK = 64 << 10  # data is copied in chunks no larger than _META_READ


class ArchiveLimits(TypedDict):
    """Keyword arguments of :func:`extract_archive` (see :func:`archive_limits`)."""

    max_members: int
    max_bytes: int
    max_ratio: float


def archive_limits(budget_bytes: int) -> ArchiveLimits:
    """Caps for :func:`extract_archive` derived from a device's memory budget (bytes).

    ``max_bytes`` is the budget itself: the device reads model.pte whole into memory, so
    a bundle that unpacks to more than the budget could never be served (and each member
    is capped by what is left of it). ``max_members`` is :data:`MAX_MEMBERS`,
    ``max_ratio`` :data:`MAX_RATIO`; neither depends on the budget.

        extract_archive(upload, tmp, **archive_limits(profile.memory_budget_bytes))
    """
    budget = int(budget_bytes)
    if budget < 1:
        raise ConfigError(f"archive budget must be >= 1 byte, got {budget_bytes}")
    return ArchiveLimits(max_members=MAX_MEMBERS, max_bytes=budget, max_ratio=MAX_RATIO)


def _show(name: str) -> str:
    """A member name fit for a one-line message (control characters, surrogates escaped)."""
    text = name if _plain_text(name) else ascii(name)
    return text if len(text) <= 80 else text[:77] + "..."


def _plain_text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in a tar name arrive as surrogates
        return False
    return name.isprintable()


class _ArchiveCap(Exception):
    """Raised inside the bounded stream; turned into a BundleError by extract_archive."""


class _Bounded:
    """The decompressed tar stream, refusing to go past ``limit`` bytes and any single
    read larger than ``max_read`` (tarfile reads a pax or long-name header in one call of
    its declared size: without this a header declaring 2 GB would be read into memory)."""

    def __init__(self, inner: io.BufferedIOBase, limit: int, max_read: int) -> None:
        self._inner = inner
        self._limit = limit
        self._max_read = max_read

    def _check(self, end: int) -> None:
        if end > self._limit:
            raise _ArchiveCap(f"the archive unpacks to more than {self._limit} bytes")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._max_read:
            raise _ArchiveCap(f"archive metadata larger than {self._max_read} bytes")
        self._check(self._inner.tell() + n)
        return self._inner.read(n)

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self._inner.tell() + pos if whence == 1 else -1
        if target < 0:
            raise _ArchiveCap("the archive asks for a seek tarfile never makes")
        self._check(target)
        return self._inner.seek(target)

    def tell(self) -> int:
        return self._inner.tell()


def _decompressed(raw: io.BufferedReader) -> io.BufferedIOBase:
    """The archive's tar stream, decompressed on the fly by its magic bytes (gzip, bz2,
    xz, or a plain tar)."""
    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic[:3] == b"BZh":
        return bz2.BZ2File(raw, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, "rb")
    return raw


def extract_archive(
    archive: str | Path,
    dest: str | Path,
    *,
    max_members: int = MAX_MEMBERS,
    max_bytes: int = 1 << 30,
    max_ratio: float = MAX_RATIO,
) -> Path:
    """Safely unpack a bundle archive (``.tar.gz``, also ``.tar``, bz2, xz) into ``dest``.

    Its files at the top level or in one top folder (what ``make_archive`` or ``tar -czf
    b.tar.gz bundle/`` write); only regular files and folders, no links, devices, sparse
    files, absolute paths, ``..``, nested folders, duplicate or unprintable names.

    Caps, checked from the tar headers before anything is written (the first member that
    breaks one stops the scan): at most ``max_members`` members; unpacked size (the sum
    of the declared member sizes, so also each member's) at most ``max_bytes``; at most
    ``max_ratio`` times the archive's size (plus 1 MiB for tiny archives). The
    decompressed stream itself is bounded too (headers included), so nothing tarfile
    reads can grow past the caps. :func:`archive_limits` derives them from a budget.

    Raises :class:`BundleError` (one line) on any refusal; then nothing of the archive
    stays in ``dest`` (a ``dest`` it created is removed).
    """
    dest = Path(dest)
    created = not dest.exists()
    try:
        size = os.path.getsize(archive)
    except OSError as e:
        raise BundleError(f"{archive}: cannot read the bundle archive: {e.strerror}") from e
    ratio_cap = int(max_ratio * size) + _RATIO_SLACK
    # headers: one block each, a pax or long-name header of up to _META_READ, end padding
    stream_limit = min(max_bytes, ratio_cap) + max_members * (3 * 512 + _META_READ) + (20 << 10)
    written: list[Path] = []
    try:
        with open(archive, "rb") as raw, _decompressed(raw) as inner:
            stream = _Bounded(inner, stream_limit, _META_READ)
            with tarfile.open(fileobj=stream, mode="r:") as tar:  # type: ignore[call-overload]
                files = _scan(tar, archive, max_members=max_members, max_bytes=max_bytes,
                              ratio_cap=ratio_cap, max_ratio=max_ratio)
                dest.mkdir(parents=True, exist_ok=True)
                for member, name in files:
                    src = tar.extractfile(member)
                    if src is None:  # not reachable: _scan keeps regular files only
                        raise BundleError(f"{archive}: cannot read {_show(member.name)}")
                    out = dest / name
                    # "x": never through a link or over a file that was there before
                    try:
                        f = open(out, "xb")  # noqa: SIM115 - closed just below
                    except FileExistsError as e:
                        raise BundleError(f"{out} already exists; unpack a bundle archive "
                                          "into an empty folder") from e
                    with f:
                        written.append(out)
                        shutil.copyfileobj(src, f, _COPY_CHUNK)
    except _ArchiveCap as e:
        _remove(written, dest if created else None)
        raise BundleError(f"{archive}: refused: {e}") from None
    except BundleError:
        _remove(written, dest if created else None)
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as e:
        _remove(written, dest if created else None)
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise BundleError(f"{archive}: not a readable .tar.gz bundle archive: {reason}") from e
    return dest


def _scan(tar: tarfile.TarFile, archive: str | Path, *, max_members: int, max_bytes: int,
          ratio_cap: int, max_ratio: float) -> list[tuple[tarfile.TarInfo, str]]:
    """Every file member with the name it gets in the bundle folder, all caps checked
    header by header (member data is skipped, not read)."""
    members: list[tarfile.TarInfo] = []
    total = 0
    while True:
        m = tar.next()
        if m is None:
            break
        members.append(m)
        if len(members) > max_members:
            raise BundleError(f"{archive}: refused: more than {max_members} members "
                              "(a bundle holds a handful of files)")
        if not (m.isdir() or m.type in (tarfile.REGTYPE, tarfile.AREGTYPE)) or m.sparse:
            raise BundleError(f"{archive}: archive holds {_show(m.name)}, which is not a "
                              "regular file or folder (links, devices, sparse files are refused)")
        parts = Path(m.name).parts
        if (not _plain_text(m.name) or Path(m.name).is_absolute() or ".." in parts
                or (m.isfile() and not parts)
                or any(len(p.encode()) > 255 for p in parts)):
            raise BundleError(f"{archive}: archive member {_show(m.name)} is not a plain bundle "
                              "file name (absolute, '..', unprintable or over 255 bytes)")
        total += m.size if m.isfile() else 0
        if total > max_bytes:
            raise BundleError(f"{archive}: refused: unpacks to more than {max_bytes} bytes "
                              f"(at {_show(m.name)}, {m.size} bytes)")
        if total > ratio_cap:
            raise BundleError(f"{archive}: refused: unpacks to more than {max_ratio:g} times "
                              f"its size (at {_show(m.name)}, {m.size} bytes)")
    files = [m for m in members if m.isfile()]
    if not files:
        raise BundleError(f"{archive}: the archive holds no files; expected a bundle "
                          "(manifest.json, model.pte)")
    names = [Path(m.name).parts for m in files]
    top = names[0][0]
    # an archive of a folder (dir/manifest.json) or of its files (manifest.json)
    nested = all(len(n) == 2 and n[0] == top for n in names)
    for m in members:
        n = Path(m.name).parts
        if m.isdir() and not (len(n) == 0 or (nested and n == (top,))):
            raise BundleError(f"{archive}: archive folder {_show(m.name)} is not the bundle's "
                              "folder (a bundle has no sub-folders)")
    out: list[tuple[tarfile.TarInfo, str]] = []
    seen: set[str] = set()
    for m, n in zip(files, names):
        rel = n[1:] if nested else n
        if len(rel) != 1:
            raise BundleError(f"{archive}: archive member {_show(m.name)} is not a plain "
                              "bundle file (a bundle has no sub-folders)")
        if rel[0] in seen:
            raise BundleError(f"{archive}: archive holds {_show(rel[0])} twice")
        seen.add(rel[0])
        out.append((m, rel[0]))
    return out


def _remove(paths: list[Path], folder: Path | None) -> None:
    """Undo a refused extraction: the files it wrote, and the folder if it made it."""
    for p in paths:
        p.unlink(missing_ok=True)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
