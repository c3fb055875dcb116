"""The bundle's ``manifest.json``: a versioned, validated, allowlisted format.

    from toma_edge.bundle import Manifest, read_manifest
    m = read_manifest("dist/rpi4/manifest.json")   # BundleError on unknown version/keys
    m.inputs[0].shape                                # [-1, 10]: -1 marks the batch dimension
    m.files["model.pte"].sha256

Both sides use it: the host writes it, the device reads and checks it. No torch here.
A manifest is untrusted input on the device: it is read through the strict JSON entry
(:mod:`toma_edge.jsonio`: depth limit, 64-bit integers, valid UTF-8), at most
:data:`MAX_MANIFEST_BYTES`, and every refusal is one BundleError line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .._validation import describe_validation_error
from ..errors import BundleError, InputError
from ..jsonio import loads

__all__ = [
    "SCHEMA_VERSION",
    "TensorSpec",
    "TargetInfo",
    "FileEntry",
    "Memory",
    "CandidateEntry",
    "Metrics",
    "DataInfo",
    "BuildInfo",
    "Manifest",
    "read_manifest",
    "parse_manifest",
    "sha256_file",
    "MAX_MANIFEST_BYTES",
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "read_limited",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MANIFEST_BYTES = 1 << 20
"""Largest manifest.json read (a real one is ~3 KB, candidates included)."""

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

    @field_validator("measured_peak_bytes")
    @classmethod
    def _batches(cls, v: dict[str, int]) -> dict[str, int]:
        for k in v:
            if not (k.isascii() and k.isdigit() and int(k) >= 1):
                raise ValueError("keys must be batch sizes (whole numbers >= 1)")
        return v

    def peak_for_batch(self, batch: int) -> int:
        """Measured RSS increase for ``batch`` rows, interpolated (affine) between points."""
        pts = sorted((int(k), v) for k, v in self.measured_peak_bytes.items())
        if not pts:
            return self.planned_bytes
        for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
            if b0 <= batch <= b1:
                return int(v0 + (v1 - v0) * (batch - b0) / max(1, b1 - b0))
        return pts[0][1] if batch < pts[0][0] else pts[-1][1]



Quantization = Literal["int8", "int8-dynamic", "fp32"]


class CandidateEntry(BaseModel):
    """One compression variant the build measured (sizes in bytes, latency in ms). Its
    validation metric is the one the search scored: ``val_*`` (a validation split of the
    training rows) or ``cv_*`` (cross-validation); None when it was not scored."""

    model_config = _Frozen
    quantization: Quantization
    prune: float = Field(ge=0, le=1)
    pte_bytes: int = Field(ge=0)
    planned_bytes: int = Field(ge=0)
    latency_ms: float | None
    fits: bool
    miss: str | None = None
    val_r2: float | None = None
    val_accuracy: float | None = None
    cv_r2: float | None = None
    cv_accuracy: float | None = None
    measured_peak_bytes: int = Field(ge=0)
    shipped: bool = False
    #: why the build dropped it (failed to export or run, or disagreed with its eager model)
    dropped: str | None = None
    #: the one batch its program runs at, when the graph allowed no dynamic batch
    export_batch: int | None = Field(default=None, ge=1)


class Metrics(BaseModel):
    """Metric name -> value of the fp32 reference model and of the shipped program
    (``test_*`` on the test split, ``cv_*`` means over cross-validation folds)."""

    model_config = _Frozen
    reference: dict[str, float]
    shipped: dict[str, float]


class DataInfo(BaseModel):
    """Row counts the build used, and whether the data was the built-in example."""

    model_config = _Frozen
    train_rows: int = Field(ge=0)
    test_rows: int = Field(ge=0)
    validation_rows: int | None = Field(default=None, ge=0)
    builtin_example: bool


class BuildInfo(BaseModel):
    """How the bundle was made: the runtime adapter that measured it, the largest
    difference between program and eager model on the verification rows, the training
    settings (``build``) or the saved model it compressed (``compress``)."""

    model_config = _Frozen
    measured_with: str
    command: Literal["build", "compress", "package"] | None = None
    source_model: str | None = None
    verify_max_abs_diff: float
    #: what verification measured (top1_agreement, accuracy_change, relative_error, ...)
    verify: dict[str, float] | None = None
    train: dict[str, Any] | None = None
    data: DataInfo
    #: what the build warns about (a reference model at chance level, ...)
    warnings: tuple[str, ...] = ()
    #: the shipped variant's eager fp32 model saved beside the bundle (a name beside it)
    eager_model: str | None = None
    #: the trained model before pruning, saved beside the bundle when the variant is pruned
    trained_model: str | None = None


class Manifest(BaseModel):
    """What ``toma-edge build`` writes (through :mod:`toma_edge.bundle.writer`) and the
    device checks."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())
    schema_version: int
    name: str
    version: str
    task: Literal["regression", "classification"]
    target: TargetInfo
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int = Field(ge=1)
    #: set when the program runs at exactly this batch (recurrent graphs): the runtime pads
    #: shorter batches to it and splits longer ones; max_batch is then the same number
    export_batch: int | None = Field(default=None, ge=1)
    shipped: Quantization
    compression: dict[str, Any]
    batch_dependent: bool
    memory: Memory
    metrics: Metrics
    files: dict[str, FileEntry]
    versions: dict[str, str]
    classes: tuple[str, ...] | None = None
    created: str | None = None
    candidates: tuple[CandidateEntry, ...] | None = None
    build: BuildInfo | None = None

    @field_validator("name", "version")
    @classmethod
    def _label(cls, v: str) -> str:
        if not 1 <= len(v) <= 200 or not v.isprintable():
            raise ValueError("must be 1 to 200 printable characters on one line")
        return v

    @field_validator("files")
    @classmethod
    def _file_names(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in v:
            if not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
                raise ValueError("file names must be plain names in the bundle folder "
                                 "(letters, digits, '.', '_', '-', '+'; no folders)")
        return v

    @field_validator("compression")
    @classmethod
    def _compression(cls, v: dict[str, Any]) -> dict[str, Any]:
        prune = v.get("prune", 0.0)
        if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0 <= prune <= 1:
            raise ValueError("'prune' must be a number from 0 to 1")
        return v

    @model_validator(mode="after")
    def _fixed_batch(self) -> Manifest:
        if self.export_batch is not None and self.export_batch != self.max_batch:
            raise ValueError(f"export_batch {self.export_batch} must equal max_batch "
                             f"{self.max_batch} (a fixed-batch program runs at that size)")
        return self

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
        version = data.get("schema_version")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise BundleError(
                f"{where}: schema_version {_short(version)} is not supported "
                f"(this toma-edge reads {SCHEMA_VERSION}); rebuild the bundle with this release"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise BundleError(f"{where}: {_one_line(describe_validation_error(e))}") from e


_PLAIN_NAME = re.compile(r"[A-Za-z0-9._+-]{1,255}")


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` with control characters and lone surrogates escaped, at most ``limit``."""
    out = "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF
                  else ascii(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _short(value: Any) -> str:
    return _one_line(repr(value), 40)


def parse_manifest(raw: bytes, *, where: str = "manifest.json") -> Manifest:
    """Validate a manifest from its bytes (the very bytes a signature was checked on)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: manifest is larger than {MAX_MANIFEST_BYTES} bytes; "
                          "this is not a toma-edge manifest")
    try:
        data = loads(raw, what="manifest")
    except InputError as e:
        # jsonio says "manifest: invalid JSON (why)" or "manifest nests ..." / "holds ..."
        detail = _one_line(str(e).removeprefix("manifest: invalid JSON ")
                           .removeprefix("manifest "))
        detail = detail if detail.startswith("(") else f"(it {detail})"
        raise BundleError(f"{where}: manifest is not valid JSON {detail}; "
                          "the bundle is corrupt") from e
    return Manifest.from_dict(data, where=where)


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file; BundleError names what is wrong."""
    p = Path(path)
    return parse_manifest(read_limited(p, MAX_MANIFEST_BYTES, what="manifest"), where=str(p))


def read_limited(path: Path, limit: int, *, what: str) -> bytes:
    """A file's bytes, at most ``limit`` + 1 of them (more means "too large" to callers)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise BundleError(f"{path}: cannot read {what}: {e.strerror or e}") from e


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
