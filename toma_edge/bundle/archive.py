"""Bundle archives: write a ``.tar.gz`` of a bundle folder, and unpack one safely.

    from toma_edge.bundle import archive_limits, extract_archive, make_archive
    make_archive("dist/rpi4", "dist/rpi4.tar.gz")
    extract_archive("up.tar.gz", "tmp/up", **archive_limits(512 << 20))  # caps from a budget

Archives are an input surface (``run``/``serve`` on a ``.tar.gz``, ``POST /v1/model``):
:func:`extract_archive` caps the member count, the unpacked size and the compression
ratio from the tar headers before anything is written, and bounds every read while it
streams, so a zip bomb or a 300,000-member archive is refused in milliseconds.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import TypedDict

from ..errors import BundleError, ConfigError

__all__ = [
    "extract_archive",
    "make_archive",
    "ArchiveLimits",
    "archive_limits",
    "MAX_MEMBERS",
    "MAX_RATIO",
]


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
