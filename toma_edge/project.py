"""The project file (``toma-edge.yaml``) of a user's own model, validated on load.

    from toma_edge.project import load_project
    proj = load_project("toma-edge.yaml")
    proj.task, proj.train.epochs, proj.compress.quantize
    proj.root                                   # folder put on sys.path for module:callable

No torch here; the host imports the ``model`` and ``data`` callables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._validation import describe_validation_error
from .errors import ConfigError

__all__ = ["TrainConfig", "CompressConfig", "VerifyConfig", "ExportConfig", "ProjectConfig",
           "load_project"]

_Cfg = ConfigDict(frozen=True, extra="forbid")


class TrainConfig(BaseModel):
    """How the model is trained. ``batch_size`` is the optimisation's batch; micro-batches
    (gradient accumulation) and checkpointing only change memory, not what is learned."""

    model_config = _Cfg
    epochs: int = Field(30, ge=1, le=100000)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    micro_batch: int | Literal["auto"] = "auto"
    checkpointing: bool | Literal["auto", "off"] = "auto"
    folds: int = Field(5, ge=0, le=50)
    seed: int = 0
    weight_decay: float = Field(0.0, ge=0)

    @field_validator("folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError("folds must be 0 (no cross-validation) or at least 2")
        return v


QuantizeKind = Literal["int8", "int8-dynamic", "none", "fp32", "auto"]


class VerifyConfig(BaseModel):
    """How close a shipped program must stay to its eager model on held-out rows, at
    several batch sizes: a classifier's top-1 class on at least ``min_agreement`` of the
    rows; a regressor within ``max_error`` (RMS difference over the eager outputs' standard
    deviation). fp32 programs are held to at least 99% / at most 0.1%."""

    model_config = _Cfg
    min_agreement: float = Field(0.97, gt=0, le=1)
    max_error: float = Field(0.05, gt=0)
    #: a quantized program against the fp32 model: looser bounds that catch a broken
    #: quantization (calibration rows that do not represent the data), not a lossy one
    min_fp32_agreement: float = Field(0.8, gt=0, le=1)
    max_fp32_error: float = Field(0.25, gt=0)


class CompressConfig(BaseModel):
    """Which compression variants build may try (see ``toma-edge compress``).

    ``quantize``: one kind, ``auto`` (fp32, int8, int8-dynamic), or a list of kinds to try
    (``[fp32, int8]`` leaves out int8-dynamic). ``finetune_epochs``: epochs of fine-tuning
    after pruning (default: a fifth of ``train.epochs``, at least 5)."""

    model_config = _Cfg
    quantize: QuantizeKind | list[Literal["int8", "int8-dynamic", "fp32"]] = "int8"
    prune: float | Literal["auto"] = 0.0
    calibration_batches: int = Field(8, ge=1)
    tolerance: float | None = Field(None, ge=0)
    finetune_epochs: int | None = Field(None, ge=1, le=100000)
    verify: VerifyConfig = VerifyConfig()

    @field_validator("quantize")
    @classmethod
    def _kinds(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("a list of kinds must name at least one "
                                 "(int8, int8-dynamic, fp32)")
            if len(set(v)) != len(v):
                raise ValueError("a kind is listed twice")
        return v

    @field_validator("prune")
    @classmethod
    def _prune(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            raise ValueError("prune must be a fraction in [0, 1) or 'auto'")
        return v


class ExportConfig(BaseModel):
    model_config = _Cfg
    #: the program's dynamic batch runs 1..max_batch (2 at least: export needs a range)
    max_batch: int = Field(256, ge=2, le=65536)


class ProjectConfig(BaseModel):
    """A user's project: docs/architecture.md, "The project file"."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    task: Literal["regression", "classification"]
    model: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    data: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    version: str | None = None
    classes: list[str] | None = None
    train: TrainConfig = TrainConfig()
    compress: CompressConfig = CompressConfig()
    export: ExportConfig = ExportConfig()
    root: Path = Path(".")


def load_project(path: str | Path) -> ProjectConfig:
    """Read and validate a project file; errors name the file and the field."""
    p = Path(path)
    try:
        data: Any = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: project file not found") from e
    except OSError as e:
        raise ConfigError(f"{p}: cannot read project file: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a project file must be a YAML mapping "
                          "(name, task, model, data, ...)")
    if "root" in data:
        raise ConfigError(f"{p}: field 'root' is not a project setting")
    try:
        return ProjectConfig.model_validate({**data, "root": p.resolve().parent})
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "string_pattern_mismatch" and err["loc"] in (("model",), ("data",)):
            raise ConfigError(f"{p}: field '{err['loc'][0]}': must be module:callable "
                              "(e.g. mymodels:build)") from e
        raise ConfigError(f"{p}: {describe_validation_error(e)}") from e
