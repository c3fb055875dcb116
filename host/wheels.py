"""The device's wheels for a target, so a device with no build tools installs from files.

    from toma_edge.host.wheels import write_wheels
    ws = write_wheels("rpi", "dist/rpi4-wheels")      # aarch64, CPython 3.11
    # on the device:  pip install --no-index --find-links rpi4-wheels toma-edge

Three kinds of wheel land in the folder: toma-edge itself (pure Python, built from this
source tree), toma-edge-native for the target's architecture and Python (built here with
scikit-build-core; for aarch64 cross-built with ``scripts/build_native.sh``, which sets up
Debian's cross compiler and an arm64 Python sysroot), and every third-party dependency of
the plain (device) install, downloaded as binary wheels for the target's platform
(manylinux up to the target's glibc). No torch and no executorch Python package.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, TomaEdgeError
from ..extras import is_host_only_distribution
from ..profiles import load_profile

__all__ = ["WheelSet", "write_wheels", "source_root"]


class WheelError(TomaEdgeError):
    """A wheel could not be built or downloaded."""


@dataclass(frozen=True)
class WheelSet:
    out: Path
    arch: str
    python: str
    wheels: tuple[Path, ...]

    @property
    def total_bytes(self) -> int:
        return sum(w.stat().st_size for w in self.wheels)

    def summary(self) -> list[str]:
        from ..budget import format_size

        lines = [f"{len(self.wheels)} wheels for {self.arch}, CPython {self.python} "
                 f"({format_size(self.total_bytes)}) in {self.out}"]
        lines += [f"  {w.name} ({format_size(w.stat().st_size)})" for w in self.wheels]
        lines.append("on the device: pip install --no-index "
                     f"--find-links {self.out.name} toma-edge")
        return lines


def source_root() -> Path:
    """This install's source tree (a clone, installed editable or not), or ConfigError."""
    here = Path(__file__).resolve().parent.parent  # host/ -> the repository root
    native = here / "device" / "native" / "pyproject.toml"
    if (here / "pyproject.toml").is_file() and native.is_file():
        return here
    raise ConfigError("writing the device's wheels needs toma-edge's source tree (a git clone "
                      "installed with pip install -e); this install has none")


def _run(cmd: list[str], what: str, *, env: dict[str, str] | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WheelError(f"{what} failed: {tail[0]}")


def _platforms(arch: str, glibc: str) -> list[str]:
    """Every manylinux tag the target's glibc runs (pip does not widen a given tag to the
    older ones), then linux_<arch>: our own native wheel's tag."""
    major, minor = (int(x) for x in glibc.split(".")[:2])
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)]
    return [*tags, f"manylinux2014_{arch}", f"linux_{arch}"]


def write_wheels(target: str, out: str | Path, *,
                 progress: Callable[[str], None] | None = None) -> WheelSet:
    """Write every wheel the plain device install of ``target`` needs into ``out``."""
    say = progress or (lambda _msg: None)
    profile = load_profile(target)
    arch, py = profile.arch, profile.os.python
    pyver = py.replace(".", "")
    root = source_root()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    here_arch = platform.machine()
    here_py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    native = arch == here_arch and py == here_py
    if not native and not (arch == "aarch64" and py == "3.11"):
        raise WheelError(f"cannot build toma-edge-native for {arch} with CPython {py} here "
                         f"(this machine: {here_arch}, CPython {here_py}; cross builds: aarch64 "
                         "with CPython 3.11)")

    with tempfile.TemporaryDirectory(prefix="toma-wheels-") as tmp:
        stage = Path(tmp)
        say("toma-edge (pure Python)")
        _run([*pip, "wheel", "--no-deps", "-w", str(stage), str(root)],
             "building the toma-edge wheel")
        say(f"toma-edge-native for {arch}, CPython {py}")
        if native:
            _run([*pip, "wheel", "--no-deps", "-w", str(stage), str(root / "device" / "native")],
                 "building the toma-edge-native wheel")
        else:
            _run(["bash", str(root / "scripts" / "build_native.sh"), "aarch64", str(stage)],
                 "cross-building the toma-edge-native wheel for aarch64 (scripts/build_native.sh)")
        (main_whl,) = stage.glob("toma_edge-*.whl")
        say("third-party wheels of the device install")
        plat = [a for p in _platforms(arch, profile.os.glibc) for a in ("--platform", p)]
        _run([*pip, "download", "--only-binary=:all:", *plat, "--python-version", pyver,
              "--implementation", "cp", "--abi", f"cp{pyver}", "--find-links", str(stage),
              "-d", str(stage), str(main_whl)],
             f"downloading the device's dependencies for {arch}")
        wheels = sorted(stage.glob("*.whl"))
        bad = [w.name for w in wheels if is_host_only_distribution(w.name.split("-")[0])]
        if bad:  # the plain install must stay torch-free
            raise WheelError(f"host-only packages reached the device's wheels: {', '.join(bad)}")
        for old in out.glob("*.whl"):
            old.unlink()
        for w in wheels:
            shutil.move(str(w), out / w.name)
    return WheelSet(out=out, arch=arch, python=py,
                    wheels=tuple(sorted(out.glob("*.whl"))))
