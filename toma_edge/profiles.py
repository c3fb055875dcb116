"""Target device profiles: one YAML per device in ``firmware_configs/``.

    from toma_edge.profiles import load_profile, list_profiles
    p = load_profile("rpi")                 # alias of rpi4
    p.name, p.memory_budget_bytes, p.working_budget_bytes("native")
    [q.name for q in list_profiles()]
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._validation import describe_validation_error
from .budget import parse_size
from .errors import ConfigError

__all__ = [
    "TargetProfile",
    "OsFloor",
    "ExportPrefs",
    "load_profile",
    "list_profiles",
    "profiles_dir",
    "profile_from_file",
]


def _size(v: Any) -> int:
    if isinstance(v, (int, float, str)) and not isinstance(v, bool):
        try:
            return parse_size(v)
        except ConfigError as e:  # pydantic names the field only for ValueError
            raise ValueError(str(e)) from e
    raise ValueError(f"{v!r} is not a size (write it like 256MiB)")


class OsFloor(BaseModel):
    """The oldest OS the target runs that our wheels support."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    distro: str
    glibc: str
    python: str


class ExportPrefs(BaseModel):
    """How build exports for this target by default."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    backend: Literal["xnnpack", "portable"] = "xnnpack"
    quantization: Literal["int8", "int8-dynamic", "fp32", "auto"] = "int8"
    max_batch: int = Field(256, ge=1, le=65536)


class TargetProfile(BaseModel):
    """A device that bundles are built for. Sizes are bytes; YAML writes them like 256MiB."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    arch: Literal["aarch64", "x86_64", "armv7l"]
    cpu: str
    cores: int = Field(ge=1)
    ram_bytes: int
    os: OsFloor
    memory_budget_bytes: int
    baseline_rss_bytes: dict[str, int]
    storage_budget_bytes: int
    train_budget_bytes: int | None = None
    threads: int = Field(ge=1)
    export: ExportPrefs = ExportPrefs()

    @field_validator(
        "ram_bytes", "memory_budget_bytes", "storage_budget_bytes", "train_budget_bytes",
        mode="before",
    )
    @classmethod
    def _sizes(cls, v: Any) -> Any:
        return None if v is None else _size(v)

    @field_validator("baseline_rss_bytes", mode="before")
    @classmethod
    def _baselines(cls, v: Any) -> Any:
        if not isinstance(v, dict) or not v:
            raise ValueError("must map a runtime adapter name to its measured baseline RSS")
        return {str(k): _size(x) for k, x in v.items()}

    def baseline_bytes(self, adapter: str | None = None) -> int:
        """Expected RSS of the device process before any work, for ``adapter``.

        With no adapter (or one the profile doesn't list) the largest listed figure is
        used, so a fit check errs on the safe side.
        """
        if adapter and adapter in self.baseline_rss_bytes:
            return self.baseline_rss_bytes[adapter]
        return max(self.baseline_rss_bytes.values())

    def working_budget_bytes(self, adapter: str | None = None) -> int:
        """The inference budget less the expected baseline: what a model may use."""
        return self.memory_budget_bytes - self.baseline_bytes(adapter)


def profiles_dir() -> Path:
    """Where the profiles live: $TOMA_EDGE_PROFILES, else the packaged firmware_configs/."""
    env = os.environ.get("TOMA_EDGE_PROFILES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "firmware_configs"


def profile_from_file(path: Path) -> TargetProfile:
    """Load and validate one profile; errors name the file and the field."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read target profile: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a target profile must be a YAML mapping")
    try:
        return TargetProfile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe_validation_error(e)}") from e


@lru_cache(maxsize=8)
def _all_profiles(directory: str) -> tuple[TargetProfile, ...]:
    d = Path(directory)
    files = sorted(d.glob("*.yaml"))
    if not files:
        raise ConfigError(f"no target profiles (*.yaml) in {d}")
    profiles = tuple(profile_from_file(f) for f in files)
    seen: dict[str, str] = {}
    for p in profiles:
        for n in (p.name, *p.aliases):
            if n in seen:
                raise ConfigError(f"{d}: target name '{n}' is used by both {seen[n]} and {p.name}")
            seen[n] = p.name
    return profiles


def list_profiles() -> list[TargetProfile]:
    """Every known target profile, sorted by name."""
    return sorted(_all_profiles(str(profiles_dir())), key=lambda p: p.name)


def load_profile(name: str) -> TargetProfile:
    """The profile called ``name`` (or one of its aliases, such as ``rpi`` for ``rpi4``)."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return profile_from_file(Path(name))
    profiles = list_profiles()
    for p in profiles:
        if name == p.name or name in p.aliases:
            return p
    known = ", ".join(
        p.name + (f" ({', '.join(p.aliases)})" if p.aliases else "") for p in profiles
    )
    raise ConfigError(f"unknown target '{name}'; known targets: {known}")
