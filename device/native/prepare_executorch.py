"""Find or fetch the ExecuTorch runtime libraries and headers to build against.

Prints the path of an ``executorch/`` folder holding ``lib/``, ``include/`` and
``share/cmake/`` from the executorch wheel of EXECUTORCH_VERSION for the target
architecture. Order: $TOMA_EXECUTORCH_DIR; the installed executorch package when it is
that version and the target is this machine; else the wheel fetched with
``pip download --no-deps`` (one ~18 MB file, no torch) and unpacked into a cache
(``$TOMA_EDGE_CACHE`` or ``~/.cache/toma-edge``), reused by later builds.
Run by CMakeLists.txt at configure time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

EXECUTORCH_VERSION = "1.5.1"
PLATFORMS = {"x86_64": "manylinux_2_28_x86_64", "aarch64": "manylinux_2_28_aarch64"}
WANTED = ("executorch/lib/", "executorch/include/", "executorch/share/cmake/")


def _usable(d: Path) -> bool:
    return (d / "lib" / "libexecutorch.so").is_file() and (d / "share" / "cmake").is_dir()


def _installed() -> Path | None:
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    try:
        from importlib import metadata

        if metadata.version("executorch") != EXECUTORCH_VERSION:
            return None
    except metadata.PackageNotFoundError:
        return None
    return d if _usable(d) else None


def _fetch(arch: str, python: str) -> Path:
    cache = Path(os.environ.get("TOMA_EDGE_CACHE", Path.home() / ".cache" / "toma-edge"))
    out = cache / f"executorch-{EXECUTORCH_VERSION}-cp{python}-{arch}"
    if _usable(out / "executorch"):
        return out / "executorch"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"executorch=={EXECUTORCH_VERSION}",
               "--no-deps", "--only-binary=:all:", "--platform", PLATFORMS[arch],
               "--python-version", python, "--implementation", "cp", "--abi", f"cp{python}",
               "-d", tmp, "-q"]
        r = subprocess.run(cmd, stdout=sys.stderr)
        if r.returncode != 0:
            sys.exit(f"prepare_executorch: pip download of executorch {EXECUTORCH_VERSION} "
                     f"for {arch} failed")
        (wheel,) = Path(tmp).glob("executorch-*.whl")
        part = out.with_name(out.name + f".part{os.getpid()}")
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(WANTED):
                    z.extract(name, part)
        for so in (part / "executorch" / "lib").glob("*.so*"):
            so.chmod(0o755)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            part.rename(out)
        except OSError:  # another build got there first
            pass
    return out / "executorch"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default=platform.machine())
    ap.add_argument("--python", default=f"{sys.version_info[0]}{sys.version_info[1]}",
                    help="target CPython version without the dot, e.g. 311")
    a = ap.parse_args()
    arch = {"arm64": "aarch64", "AMD64": "x86_64"}.get(a.arch, a.arch)
    if arch not in PLATFORMS:
        sys.exit(f"prepare_executorch: no executorch wheel for architecture '{a.arch}'")
    env = os.environ.get("TOMA_EXECUTORCH_DIR")
    if env:
        d = Path(env)
    elif arch == platform.machine() and a.python == f"{sys.version_info[0]}{sys.version_info[1]}":
        d = _installed() or _fetch(arch, a.python)
    else:
        d = _fetch(arch, a.python)
    if not _usable(d):
        sys.exit(f"prepare_executorch: {d} has no lib/libexecutorch.so or share/cmake")
    print(d)


if __name__ == "__main__":
    main()
