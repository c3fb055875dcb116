"""Write a bundle: a temporary folder beside ``out``, its files, their hashes in the
manifest, the signature, then one rename into place (and the archive).

    from toma_edge.bundle.writer import BundleWriter
    with BundleWriter("dist/rpi4") as w:          # files go to w.path, a temporary folder
        (w.path / "model.pte").write_bytes(pte)
        w.commit(manifest, sign_key="fleet.pem", archive=True)   # -> dist/rpi4 (+ .tar.gz)

Nothing reaches ``out`` unless ``commit`` ran: an exception inside the block removes the
temporary folder, so a failed build leaves nothing half-written, and an old bundle at
``out`` is replaced only by a complete one. Every path that writes a bundle uses it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from ..errors import BundleError
from .archive import make_archive
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest, sha256_file
from .verify import sign_manifest

__all__ = ["BundleWriter", "WrittenBundle", "manifest_json"]


class WrittenBundle:
    """What :meth:`BundleWriter.commit` wrote: the folder, its manifest, the archive."""

    def __init__(self, path: Path, manifest: Manifest, archive: Path | None) -> None:
        self.path, self.manifest, self.archive = path, manifest, archive


def manifest_json(manifest: Manifest) -> str:
    """The manifest as written: the keys the writer set (a null metric stays null)."""
    try:  # JSON has no NaN or infinity: the device's strict reader would refuse the bundle
        return json.dumps(manifest.model_dump(mode="json", exclude_unset=True), indent=2,
                          allow_nan=False) + "\n"
    except ValueError as e:
        raise BundleError(f"manifest.json: a value is NaN or infinite ({e}); not writing a "
                          "bundle no device can read") from e


class BundleWriter:
    """A bundle under construction in a temporary folder beside ``out`` (see the module)."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.written: WrittenBundle | None = None

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.path.exists():  # not committed (an exception, or no commit)
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, manifest: Manifest, *, sign_key: str | Path | None = None,
               archive: bool = False) -> WrittenBundle:
        """Hash every file in the folder into ``manifest.files``, check the manifest
        against the format, write it (and ``manifest.sig`` with ``sign_key``, an Ed25519
        private key in PEM), rename the folder to ``out`` and, with ``archive``, write
        ``out.tar.gz`` beside it."""
        files = {
            f.name: FileEntry(sha256=sha256_file(f), bytes=f.stat().st_size)
            for f in sorted(self.path.iterdir())
            if f.is_file() and f.name not in (MANIFEST_NAME, SIGNATURE_NAME)
        }
        data = manifest.model_dump(exclude_unset=True)
        data["files"] = {k: v.model_dump() for k, v in files.items()}
        full = Manifest.from_dict(data)  # the format we promise, checked before it is written
        (self.path / MANIFEST_NAME).write_text(manifest_json(full))
        if sign_key is not None:
            sign_manifest(self.path, sign_key)
        _replace_dir(self.path, self.out)
        arch = (make_archive(self.out, self.out.with_name(self.out.name + ".tar.gz"))
                if archive else None)
        self.written = WrittenBundle(self.out, full, arch)
        return self.written


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if not (out_dir / MANIFEST_NAME).exists() and any(out_dir.iterdir()):
            raise BundleError(f"{out_dir} exists and is not a bundle; choose another --out")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
