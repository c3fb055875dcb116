"""Load a bundle on the device: verify it (schema, versions, sha256, signature), then load
its program with the lightest runtime adapter.

    from toma_edge.device.bundle import load_bundle
    b = load_bundle("dist/rpi4", trust_key="fleet.pub")       # or "model.tar.gz"
    b.manifest.name, b.signed, b.program.adapter               # ('seed-regression', True, 'native')
    (y,) = b.program.run([np.zeros((4, 10), np.float32)])
    y.shape                                                    # (4, 1)

Each failed check raises :class:`~toma_edge.errors.BundleError` naming the check: missing
or invalid manifest, unsupported ``schema_version``, unsigned or wrongly signed (with a
trust key), a file missing, truncated or tampered (sha256), or an ExecuTorch major.minor
that differs from this runtime's. The model is hashed again from the very bytes that are
loaded, so a file swapped between the check and the load is caught too.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle import extract_archive, verify_bundle
from ..errors import BundleError, ConfigError
from ..manifest import Manifest

__all__ = ["LoadedBundle", "load_bundle", "resolve_threads"]


def resolve_threads(manifest: Manifest, threads: int | None = None) -> int:
    """XNNPACK threads: ``threads`` if given, else the target profile's (from the
    manifest), at most this machine's CPU count (more threads than cores only adds
    switching)."""
    if threads is not None:
        if int(threads) < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        return int(threads)
    want = manifest.target.threads or 1
    return max(1, min(int(want), os.cpu_count() or 1))


@dataclass(frozen=True)
class LoadedBundle:
    """A verified bundle with its program loaded and ready to run.

    ``path`` is the bundle folder (for an archive, the folder it came from is gone once
    loaded: the program lives in memory); ``source`` is what the caller named.
    ``manifest_sha256`` identifies the exact manifest (telemetry, model swaps).
    """

    source: Path
    path: Path
    manifest: Manifest
    program: Any
    signed: bool
    manifest_sha256: str
    threads: int

    @property
    def adapter(self) -> str:
        """The runtime adapter that runs the program (``"native"``, or ``"pybind"`` where only the torch-based one is installed)."""
        return str(self.program.adapter)


def _is_archive(p: Path) -> bool:
    return p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar"))


def load_bundle(
    path_or_archive: str | Path,
    *,
    trust_key: str | Path | None = None,
    threads: int | None = None,
    adapter: str = "auto",
) -> LoadedBundle:
    """Verify a bundle folder or ``.tar.gz`` archive and load its ``model.pte``.

    ``trust_key``: an Ed25519 public key (PEM); when given, an unsigned or wrongly signed
    bundle is refused. ``threads``: XNNPACK's thread count (set before the method loads;
    None: the target profile's, capped at this machine's CPUs). Raises :class:`BundleError` naming the failed check.
    """
    src = Path(path_or_archive)
    if not src.exists():
        raise BundleError(f"{src}: no such bundle (a folder from `toma-edge build`, or its .tar.gz)")
    if _is_archive(src):
        with tempfile.TemporaryDirectory(prefix="toma-edge-bundle-") as d:
            folder = extract_archive(src, Path(d))
            try:
                return _load_folder(src, folder, trust_key=trust_key, threads=threads,
                                    adapter=adapter)
            except BundleError as e:  # name the archive, not a folder that is gone
                raise BundleError(str(e).replace(str(folder), str(src))) from e
    return _load_folder(src, src, trust_key=trust_key, threads=threads, adapter=adapter)


def _load_folder(
    source: Path, folder: Path, *, trust_key: str | Path | None, threads: int | None, adapter: str
) -> LoadedBundle:
    vb = verify_bundle(folder, trust_key=trust_key)
    entry = vb.manifest.files["model.pte"]
    try:
        data = vb.model_path.read_bytes()
    except OSError as e:
        raise BundleError(f"{folder}: cannot read model.pte: {e.strerror}") from e
    # hash what we load, not what we checked a moment ago: closes the swap window
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise BundleError(
            f"{folder}: model.pte changed while it was being loaded (sha256 mismatch); "
            "copy the bundle again"
        )
    from .adapter import load_program

    n = resolve_threads(vb.manifest, threads)
    program = load_program(data, threads=n, adapter=adapter)
    _check_io(folder, vb.manifest, program)
    return LoadedBundle(source=source, path=folder, manifest=vb.manifest, program=program,
                        signed=vb.signed, manifest_sha256=vb.manifest_sha256, threads=n)


def _check_io(folder: Path, m: Manifest, program: Any) -> None:
    """The manifest must describe the program it ships (rows, batch bound)."""
    if len(program.inputs) != len(m.inputs) or len(program.outputs) != len(m.outputs):
        raise BundleError(
            f"{folder}: model.pte has {len(program.inputs)} inputs and {len(program.outputs)} "
            f"outputs but the manifest lists {len(m.inputs)} and {len(m.outputs)}; rebuild the bundle"
        )
    for spec, info in zip(m.inputs, program.inputs, strict=True):
        if tuple(info.shape[1:]) != spec.row_shape:
            raise BundleError(
                f"{folder}: input '{spec.name}' rows are {list(info.shape[1:])} in model.pte but "
                f"{list(spec.row_shape)} in the manifest; rebuild the bundle"
            )
        if info.shape and info.shape[0] < m.max_batch:
            raise BundleError(
                f"{folder}: model.pte accepts batches up to {info.shape[0]} but the manifest says "
                f"max_batch {m.max_batch}; rebuild the bundle"
            )
