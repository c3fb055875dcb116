"""The bundle's ``manifest.json``: a versioned, validated, allowlisted format.

    from toma_edge.manifest import Manifest, read_manifest
    m = read_manifest("dist/rpi4/manifest.json")   # BundleError on unknown version/keys
    m.inputs[0].shape                                # [-1, 10]: -1 marks the batch dimension
    m.files["model.pte"].sha256

Both sides use it: the host writes it, the device reads and checks it. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._validation import describe_validation_error
from .errors import BundleError

__all__ = [
    "SCHEMA_VERSION",
    "TensorSpec",
    "TargetInfo",
    "FileEntry",
    "Memory",
    "Manifest",
    "read_manifest",
    "sha256_file",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"

_Frozen = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(BaseModel):
    """An input or output: name, shape with -1 for the batch dimension, dtype."""

    model_config = _Frozen
    name: str
    shape: tuple[int, ...]
    dtype: Literal["float32", "int64", "int32", "uint8", "int8"]

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or v[0] != -1 or any(d < 1 for d in v[1:]):
            raise ValueError("shape must start with -1 (the batch dimension), then sizes >= 1")
        return v

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    @property
    def width(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n


class TargetInfo(BaseModel):
    model_config = _Frozen
    name: str
    arch: str
    memory_budget_bytes: int
    storage_budget_bytes: int | None = None
    baseline_rss_bytes: dict[str, int] | None = None
    threads: int | None = None


class FileEntry(BaseModel):
    model_config = _Frozen
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Memory(BaseModel):
    model_config = _Frozen
    pte_bytes: int
    planned_bytes: int
    measured_peak_bytes: dict[str, int]
    weights_bytes: int | None = None

    def peak_for_batch(self, batch: int) -> int:
        """Measured RSS increase for ``batch`` rows, interpolated (affine) between points."""
        pts = sorted((int(k), v) for k, v in self.measured_peak_bytes.items())
        if not pts:
            return self.planned_bytes
        for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
            if b0 <= batch <= b1:
                return int(v0 + (v1 - v0) * (batch - b0) / max(1, b1 - b0))
        return pts[0][1] if batch < pts[0][0] else pts[-1][1]


class Manifest(BaseModel):
    """What ``toma-edge build`` writes and the device checks. See DESIGN.md "Bundle"."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())
    schema_version: int
    name: str
    version: str
    task: Literal["regression", "classification"]
    target: TargetInfo
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int = Field(ge=1)
    shipped: Literal["int8", "int8-dynamic", "fp32"]
    compression: dict[str, Any]
    batch_dependent: bool
    memory: Memory
    metrics: dict[str, dict[str, float]]
    files: dict[str, FileEntry]
    versions: dict[str, str]
    classes: tuple[str, ...] | None = None
    created: str | None = None
    candidates: tuple[dict[str, Any], ...] | None = None
    build: dict[str, Any] | None = None

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not supported (this toma-edge reads {SCHEMA_VERSION})"
            )
        return v

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "manifest.json") -> Manifest:
        if not isinstance(data, dict):
            raise BundleError(f"{where}: must be a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise BundleError(
                f"{where}: schema_version {data.get('schema_version')!r} is not supported "
                f"(this toma-edge reads {SCHEMA_VERSION}); rebuild the bundle with this release"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise BundleError(f"{where}: {describe_validation_error(e)}") from e


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file; BundleError names what is wrong."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise BundleError(f"{p}: cannot read manifest: {e.strerror}") from e
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{p}: manifest is not valid JSON ({e}); the bundle is corrupt") from e
    return Manifest.from_dict(data, where=str(p))


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk_bytes)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
