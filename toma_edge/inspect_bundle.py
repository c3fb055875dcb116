"""``toma-edge inspect``: a bundle's manifest as a readable summary, files verified.

    from toma_edge.inspect_bundle import describe
    print(describe(Path("dist/rpi4")))
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .budget import format_size
from .bundle import extract_archive, verify_bundle
from .errors import BundleError

__all__ = ["describe"]


def describe(path: Path, *, trust_key: str | None = None, as_json: bool = False) -> str:
    """Verify the bundle (folder or .tar.gz) and describe it; BundleError if a check fails."""
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tempfile.TemporaryDirectory(prefix="toma-edge-inspect-") as d:
            try:
                return _describe(extract_archive(path, Path(d)), path, trust_key=trust_key,
                                 as_json=as_json)
            except BundleError as e:  # name the archive, not a folder that is gone
                raise BundleError(str(e).replace(d, str(path))) from e
    return _describe(path, path, trust_key=trust_key, as_json=as_json)


def _describe(folder: Path, path: Path, *, trust_key: str | None, as_json: bool) -> str:
    vb = verify_bundle(folder, trust_key=trust_key)
    m = vb.manifest
    if as_json:
        return m.to_json().rstrip()
    lines = [
        f"bundle      {path}",
        f"model       {m.name} {m.version} ({m.task})",
        f"target      {m.target.name} ({m.target.arch}), inference budget {format_size(m.target.memory_budget_bytes)}",
        "inputs      " + "; ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in m.inputs),
        "outputs     " + "; ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in m.outputs),
        f"max batch   {m.max_batch}" + ("  (batch-dependent: requests never share a batch)" if m.batch_dependent else ""),
        f"shipped     {m.shipped}, pruned {float(m.compression.get('prune', 0.0)):.0%}",
        f"memory      model.pte {format_size(m.memory.pte_bytes)}, planned arena {format_size(m.memory.planned_bytes)}",
        "            measured peak " + ", ".join(
            f"b{k}: {format_size(v)}" for k, v in sorted(m.memory.measured_peak_bytes.items(), key=lambda kv: int(kv[0]))),
    ]
    for label, mm in m.metrics.items():
        lines.append(f"{'metrics' if label == 'reference' else '':12s}{label:9s} " + ", ".join(
            f"{k} {v:.4f}" for k, v in mm.items()))
    if m.classes:
        lines.append(f"classes     {', '.join(m.classes)}")
    if m.candidates:
        lines.append(f"candidates  {len(m.candidates)} variants tried")
    lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    lines.append("files       " + ", ".join(f"{k} ({format_size(e.bytes)}) sha256 ok" for k, e in m.files.items()))
    sig = "signature ok" if trust_key else ("signed, not checked (no --trust-key)" if vb.signed else "unsigned")
    lines.append(f"trust       {sig}; manifest sha256 {vb.manifest_sha256[:16]}…")
    lines.append(f"runtime     {_runtime_line()}")
    return "\n".join(lines)


def _runtime_line() -> str:
    """Which runtime adapter would run the bundle on this machine, and its executorch."""
    from .bundle import runtime_executorch_version
    from .device.adapter import available_adapters

    have = available_adapters()
    if not have:
        return "no runtime adapter installed here (install toma-edge-native or toma-edge[host])"
    line = f"{have[0]} adapter (executorch {runtime_executorch_version() or 'unknown'})"
    if len(have) > 1:
        line += "; also available: " + ", ".join(have[1:])
    return line
