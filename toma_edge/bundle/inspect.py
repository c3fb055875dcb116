"""``toma-edge inspect``: a bundle's manifest as a readable summary, files verified.

    from toma_edge.bundle import RuntimeInfo, describe
    print(describe(Path("dist/rpi4")))
    print(describe(Path("dist/rpi4.tar.gz"), runtime=RuntimeInfo("1.5.1", "native adapter")))

What runs bundles here (adapter, executorch version) is the device's to know:
``toma_edge.device.bundle.describe`` passes it in as ``runtime``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..budget import format_size
from ..errors import BundleError
from .archive import extract_archive
from .verify import verify_bundle

__all__ = ["describe", "RuntimeInfo"]


@dataclass(frozen=True)
class RuntimeInfo:
    """The runtime that would run a bundle here: its executorch release (None: unknown)
    and a one-line description (adapter, alternatives)."""

    executorch: str | None
    line: str


def describe(path: Path, *, trust_key: str | None = None, as_json: bool = False,
             runtime: RuntimeInfo | None = None) -> str:
    """Verify the bundle (folder or .tar.gz) and describe it; BundleError if a check fails.

    ``runtime``: checked against the bundle's executorch version and named in the
    summary; None skips both."""
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tempfile.TemporaryDirectory(prefix="toma-edge-inspect-") as d:
            try:
                return _describe(extract_archive(path, Path(d)), path, trust_key=trust_key,
                                 as_json=as_json, runtime=runtime)
            except BundleError as e:  # name the archive, not a folder that is gone
                raise BundleError(str(e).replace(d, str(path))) from e
    return _describe(path, path, trust_key=trust_key, as_json=as_json, runtime=runtime)


def _describe(folder: Path, path: Path, *, trust_key: str | None, as_json: bool,
              runtime: RuntimeInfo | None) -> str:
    vb = verify_bundle(folder, trust_key=trust_key,
                       runtime_executorch=runtime.executorch if runtime else None)
    m = vb.manifest
    if as_json:
        return m.to_json().rstrip()
    lines = [
        f"bundle      {path}",
        f"model       {m.name} {m.version} ({m.task})",
        f"target      {m.target.name} ({m.target.arch}), "
        f"inference budget {format_size(m.target.memory_budget_bytes)}",
        "inputs      " + "; ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in m.inputs),
        "outputs     " + "; ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in m.outputs),
        f"max batch   {m.max_batch}"
        + ("  (batch-dependent: requests never share a batch)" if m.batch_dependent else ""),
        f"shipped     {m.shipped}, pruned {float(m.compression.get('prune', 0.0)):.0%}",
        f"memory      model.pte {format_size(m.memory.pte_bytes)}, "
        f"planned arena {format_size(m.memory.planned_bytes)}",
        "            measured peak " + ", ".join(
            f"b{k}: {format_size(v)}"
            for k, v in sorted(m.memory.measured_peak_bytes.items(), key=lambda kv: int(kv[0]))),
    ]
    for label, mm in (("reference", m.metrics.reference), ("shipped", m.metrics.shipped)):
        lines.append(f"{'metrics' if label == 'reference' else '':12s}{label:9s} " + ", ".join(
            f"{k} {v:.4f}" for k, v in mm.items()))
    if m.classes:
        lines.append(f"classes     {', '.join(m.classes)}")
    if m.candidates:
        lines.append(f"candidates  {len(m.candidates)} variants tried")
    lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    lines.append("files       " + ", ".join(f"{k} ({format_size(e.bytes)}) sha256 ok"
                                            for k, e in m.files.items()))
    sig = ("signature ok" if trust_key
           else "signed, not checked (no --trust-key)" if vb.signed else "unsigned")
    lines.append(f"trust       {sig}; manifest sha256 {vb.manifest_sha256[:16]}…")
    if runtime is not None:
        lines.append(f"runtime     {runtime.line}")
    return "\n".join(lines)
