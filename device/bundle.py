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

The ExecuTorch runtime trusts the program it loads: crafted model.pte bytes (with a
manifest whose hashes match them) can crash the process (SIGSEGV, abort), and no
verification flag prevents it. A bundle is trusted when it is signed and checked with a
trust key; for one that is not and that a long-running process must survive (an upload
to ``serve``), ``load_bundle(..., isolate=True)`` first loads and runs the very same bytes
once in a child process, and a child that dies is a BundleError, not a dead service.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle import Manifest, RuntimeInfo, extract_archive, verify_bundle
from ..bundle import describe as describe_with
from ..errors import BundleError, ConfigError

__all__ = [
    "LoadedBundle",
    "load_bundle",
    "resolve_threads",
    "probe_program",
    "runtime_executorch_version",
    "runtime_info",
    "describe",
]


def runtime_executorch_version() -> str | None:
    """The executorch release this device runs, or None where none is installed.

    That of the native adapter's runtime libraries where it is installed (and not
    overridden by ``TOMA_EDGE_ADAPTER=pybind``), else the executorch package's;
    ``TOMA_EDGE_RUNTIME_EXECUTORCH`` overrides both.
    """
    override = os.environ.get("TOMA_EDGE_RUNTIME_EXECUTORCH")
    if override:
        return override
    from importlib import metadata

    from .adapter import available_adapters, native_executorch_version

    if available_adapters()[:1] == ["native"]:
        v = native_executorch_version()
        if v:
            return v
    try:
        return metadata.version("executorch")
    except metadata.PackageNotFoundError:
        return None


def runtime_info() -> RuntimeInfo:
    """Which runtime adapter would run a bundle on this machine, and its executorch."""
    from .adapter import available_adapters

    have = available_adapters()
    version = runtime_executorch_version()
    if not have:
        return RuntimeInfo(version, "no runtime adapter installed here "
                                    "(install toma-edge-native or toma-edge[host])")
    line = f"{have[0]} adapter (executorch {version or 'unknown'})"
    if len(have) > 1:
        line += "; also available: " + ", ".join(have[1:])
    return RuntimeInfo(version, line)


def describe(path: str | Path, *, trust_key: str | None = None, as_json: bool = False) -> str:
    """``toma-edge inspect``: the bundle (folder or archive) verified against this
    machine's runtime and described (:func:`toma_edge.bundle.describe`)."""
    return describe_with(Path(path), trust_key=trust_key, as_json=as_json, runtime=runtime_info())


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
        """The runtime adapter that runs the program (``"native"``, or ``"pybind"`` where
        only the torch-based one is installed)."""
        return str(self.program.adapter)


def _is_archive(p: Path) -> bool:
    return p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar"))


def load_bundle(
    path_or_archive: str | Path,
    *,
    trust_key: str | Path | None = None,
    threads: int | None = None,
    adapter: str = "auto",
    isolate: bool = False,
) -> LoadedBundle:
    """Verify a bundle folder or ``.tar.gz`` archive and load its ``model.pte``.

    ``trust_key``: an Ed25519 public key (PEM); when given, an unsigned or wrongly signed
    bundle is refused. ``threads``: XNNPACK's thread count (set before the method loads;
    None: the target profile's, capped at this machine's CPUs). ``isolate``: load and run
    the program once in a child process first (:func:`probe_program`, ~0.3 s), for a
    bundle from an untrusted source. Raises :class:`BundleError` naming the failed check.
    """
    src = Path(path_or_archive)
    if not src.exists():
        raise BundleError(f"{src}: no such bundle "
                          "(a folder from `toma-edge build`, or its .tar.gz)")
    if _is_archive(src):
        with tempfile.TemporaryDirectory(prefix="toma-edge-bundle-") as d:
            folder = extract_archive(src, Path(d))
            try:
                return _load_folder(src, folder, trust_key=trust_key, threads=threads,
                                    adapter=adapter, isolate=isolate)
            except BundleError as e:  # name the archive, not a folder that is gone
                raise BundleError(str(e).replace(str(folder), str(src))) from e
    return _load_folder(src, src, trust_key=trust_key, threads=threads, adapter=adapter,
                        isolate=isolate)


def _load_folder(
    source: Path, folder: Path, *, trust_key: str | Path | None, threads: int | None,
    adapter: str, isolate: bool = False,
) -> LoadedBundle:
    vb = verify_bundle(folder, trust_key=trust_key,
                       runtime_executorch=runtime_executorch_version())
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
    if isolate:
        probe_program(data, adapter=adapter, where=folder / "model.pte",
                      batch=vb.manifest.export_batch or 1)
    program = load_program(data, threads=n, adapter=adapter)
    _check_io(folder, vb.manifest, program)
    return LoadedBundle(source=source, path=folder, manifest=vb.manifest, program=program,
                        signed=vb.signed, manifest_sha256=vb.manifest_sha256, threads=n)


def _check_io(folder: Path, m: Manifest, program: Any) -> None:
    """The manifest must describe the program it ships (rows, batch bound)."""
    if len(program.inputs) != len(m.inputs) or len(program.outputs) != len(m.outputs):
        raise BundleError(
            f"{folder}: model.pte has {len(program.inputs)} inputs and {len(program.outputs)} "
            f"outputs but the manifest lists {len(m.inputs)} and {len(m.outputs)}; "
            "rebuild the bundle"
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


def probe_program(data: bytes, *, adapter: str = "auto", where: str | Path = "model.pte",
                  timeout_s: float = 120.0, batch: int = 1) -> None:
    """Load ``data`` (a .pte's bytes) and run it once on zeros (``batch`` rows: one, or a
    fixed-batch program's batch) in a child process; BundleError if the child crashes,
    hangs past ``timeout_s`` or fails.

    The child costs a Python start and one more copy of the model for a moment (~0.3 s,
    a few MiB for a small model); the caller then loads the same bytes in-process.
    """
    try:
        r = subprocess.run([sys.executable, "-m", "toma_edge.device.bundle", "--probe", adapter,
                            str(int(batch))],
                           input=data, capture_output=True, timeout=timeout_s,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired as e:
        raise BundleError(f"{where}: the program did not load and run within {timeout_s:g} s "
                          "in a test process; refused") from e
    except OSError as e:
        raise BundleError(f"{where}: cannot start a process to test the program: "
                          f"{e.strerror or e}") from e
    if r.returncode == 0:
        return
    if r.returncode < 0:
        try:
            sig = signal.Signals(-r.returncode).name
        except ValueError:
            sig = f"signal {-r.returncode}"
        raise BundleError(f"{where}: the program crashes the ExecuTorch runtime ({sig} when "
                          "loaded and run in a test process); refused: a malformed or hostile "
                          "model.pte (sign bundles and serve with --trust-key)")
    lines = r.stdout.decode("utf-8", "replace").strip().splitlines()
    why = lines[-1] if lines else f"exit code {r.returncode}"
    raise BundleError(f"{where}: {why}")


def _probe_main(adapter: str, batch: int = 1) -> int:
    """The child of :func:`probe_program`: the .pte's bytes on stdin."""
    import numpy as np

    from ..errors import TomaEdgeError
    from .adapter import load_program

    try:
        prog = load_program(sys.stdin.buffer.read(), threads=1, adapter=adapter)
        arrays = [np.zeros((batch, *i.shape[1:]), dtype=i.dtype) for i in prog.inputs]
        prog.run(arrays)
    except TomaEdgeError as e:
        print(" ".join(str(e).split()))
        return 2
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    sys.exit(_probe_main(sys.argv[2] if len(sys.argv) > 2 else "auto",
                         int(sys.argv[3]) if len(sys.argv) > 3 else 1))
