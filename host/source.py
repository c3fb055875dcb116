"""Where build's model and data come from: the built-in example or a user's project.

    from toma_edge.host.source import load_source
    src = load_source(None)                       # the built-in example
    src = load_source("toma-edge.yaml")           # a project: imports model and data
    model = src.factory(); src.X_train.shape

Checks what the user's callables return, with one-line errors naming the problem.

The data callable may return file paths instead of arrays (str or Path; a relative path
is taken from the project file's folder): X_train a .npy or CSV, y_train a path or an
array, X_test/y_test paths or arrays. Then ``src.training`` is a file-backed
:class:`~toma_edge.host.training_data.FileData` that the trainer and cross-validation
read through a BudgetedLoader (validated here by one streamed pass, a bounded chunk at a
time), ``src.X_train``/``src.y_train`` are a bounded in-memory sample of the training
rows (at most 8192 rows and 64 MiB: the compression search, calibration and the export
example use it), and the test split is read into memory (it is only reported).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError, InputError, TomaEdgeError
from ..profiles import TargetProfile
from ..project import ProjectConfig, load_project
from .training_data import ArrayData, FileData, TrainingData

__all__ = ["ModelSource", "load_source", "model_outputs", "import_callable", "builtin_project"]


@dataclass
class ModelSource:
    """A resolved project: config, model factory and validated arrays."""

    project: ProjectConfig
    factory: Callable[[], nn.Module]
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    builtin: bool = False
    classes: list[str] = field(default_factory=list)
    #: the rows to train on; None means the arrays X_train, y_train
    training_data: TrainingData | None = None

    @property
    def task(self) -> str:
        return self.project.task

    @property
    def training(self) -> TrainingData:
        """All training rows: the arrays, or the file-backed data X_train samples."""
        if self.training_data is not None:
            return self.training_data
        return ArrayData(self.X_train, self.y_train, task=self.task)


def import_callable(ref: str, root: Path, *, what: str) -> Callable[..., Any]:
    """Import ``module:callable`` with the project's folder first on sys.path."""
    mod_name, _, attr = ref.partition(":")
    root_s = str(root)
    if root_s in sys.path:
        sys.path.remove(root_s)
    sys.path.insert(0, root_s)
    importlib.invalidate_caches()
    _forget_foreign_module(mod_name.split(".")[0], root)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # the user's module may raise anything while importing
        raise ConfigError(
            f"{what} '{ref}': cannot import module '{mod_name}' from {root}: "
            f"{type(e).__name__}: {e}"
        ) from e
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"{what} '{ref}': module '{mod_name}' has no callable '{attr}'")
    return fn  # type: ignore[no-any-return]


def _forget_foreign_module(top: str, root: Path) -> None:
    """A module of that name loaded from another folder must not answer for this project."""
    loaded = sys.modules.get(top)
    if loaded is None or not ((root / f"{top}.py").exists() or (root / top).is_dir()):
        return
    loaded_file = getattr(loaded, "__file__", None)
    if loaded_file and Path(loaded_file).resolve().is_relative_to(root.resolve()):
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


def builtin_project() -> ProjectConfig:
    """The built-in example as a project: 100 epochs, batch 32, 5 folds; quantization and
    max batch from the target profile (int8 and 256 for rpi4)."""
    return ProjectConfig.model_validate({
        "name": "seed-regression",
        "task": "regression",
        "model": "toma_edge.host.example:ExampleRegressor",
        "data": "toma_edge.host.example:make_data",
        "train": {"epochs": 100, "lr": 1e-3, "batch_size": 32, "folds": 5, "seed": 0},
        "compress": {"prune": 0.0},
    })


def _as_array(a: Any, name: str) -> np.ndarray:
    if isinstance(a, (str, Path)):
        raise InputError(f"data: {name} is a path ({a}) but X_train is not; return paths "
                         "for X_train (and any other) or arrays for all")
    try:
        arr = np.asarray(a)
    except Exception as e:
        raise InputError(f"data: {name} cannot be turned into a numpy array: {e}") from e
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"data: {name} must be numeric, got dtype {arr.dtype}")
    return arr


def _check_data(out: Any, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise InputError(
            "data: the data callable must return (X_train, y_train, X_test, y_test), "
            f"got {type(out).__name__}"
            f"{' of length ' + str(len(out)) if isinstance(out, (tuple, list)) else ''}"
        )
    X_tr, y_tr, X_te, y_te = (_as_array(a, n)
                              for a, n in zip(out, ("X_train", "y_train", "X_test", "y_test")))
    if X_tr.ndim < 2:
        raise InputError("data: X_train must have a row dimension and features, "
                         f"got shape {X_tr.shape}")
    if X_te.shape[1:] != X_tr.shape[1:]:
        raise InputError(f"data: X_test rows have shape {X_te.shape[1:]} "
                         f"but X_train rows {X_tr.shape[1:]}")
    for X, y, n in ((X_tr, y_tr, "train"), (X_te, y_te, "test")):
        if len(X) != len(y):
            raise InputError(f"data: X_{n} has {len(X)} rows but y_{n} has {len(y)}")
        if len(X) == 0:
            raise InputError(f"data: the {n} split is empty")
        if not np.isfinite(X).all():
            raise InputError(f"data: X_{n} holds NaN or infinite values")
        if task == "regression" and not np.isfinite(y.astype(np.float64)).all():
            raise InputError(f"data: y_{n} holds NaN or infinite values")
    n_classes = 0
    if task == "classification":
        for y, n in ((y_tr, "train"), (y_te, "test")):
            yy = y.reshape(-1) if y.ndim > 1 and y.shape[1:] == (1,) else y
            if yy.ndim != 1 or not np.all(np.equal(np.mod(yy, 1), 0)) or yy.min() < 0:
                raise InputError(f"data: y_{n} must hold class indices 0..K-1 for classification")
        n_classes = int(max(y_tr.max(), y_te.max())) + 1
        y_tr = y_tr.reshape(-1).astype(np.int64)
        y_te = y_te.reshape(-1).astype(np.int64)
    else:
        y_tr = y_tr.astype(np.float32).reshape(len(y_tr), -1)
        y_te = y_te.astype(np.float32).reshape(len(y_te), -1)
        if y_te.shape[1] != y_tr.shape[1]:
            raise InputError(f"data: y_test has {y_te.shape[1]} targets per row "
                             f"but y_train {y_tr.shape[1]}")
    return X_tr.astype(np.float32), y_tr, X_te.astype(np.float32), y_te, n_classes


def _is_path(a: Any) -> bool:
    return isinstance(a, (str, Path))


def _resolve(a: str | Path, root: Path, name: str) -> Path:
    p = Path(a).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise InputError(f"data: {name} path {p} does not exist or is not a file")
    if p.suffix.lower() not in (".npy", ".csv", ".txt"):
        raise InputError(f"data: {name} path {p} is not a .npy or .csv file")
    return p


def _load_small(a: Any, root: Path, name: str) -> Any:
    """A test-split (or target) path read into memory; arrays pass through."""
    if not _is_path(a):
        return a
    from ..data_loading import open_source

    src = open_source(_resolve(a, root, name))
    return src.read(0, src.rows)


def _open_training_files(raw: Any, task: str, root: Path) -> tuple[FileData, tuple[Any, ...]]:
    """X_train as a file (y_train a path or an array), validated by one streamed pass."""
    if not isinstance(raw, (tuple, list)) or len(raw) != 4:
        _check_data(raw, task)  # the usual message about the 4-tuple
    x_p = _resolve(raw[0], root, "X_train")
    y = raw[1]
    if _is_path(y):
        y = _resolve(y, root, "y_train")
    else:
        y = _as_array(y, "y_train")
    data = FileData.open(x_p, y, task=task)
    if len(data.row_shape) < 1:
        raise InputError(f"data: X_train ({x_p}) must have a row dimension and features")
    if not np.issubdtype(data.x.dtype, np.number):
        raise InputError(f"data: X_train ({x_p}) must be numeric, got dtype {data.x.dtype}")
    if data.rows == 0:
        raise InputError("data: the train split is empty")
    row0 = 0
    for xs, ys in data.scan():
        if not np.isfinite(xs).all():
            bad = row0 + int(np.argmin(np.isfinite(xs).reshape(len(xs), -1).all(axis=1)))
            raise InputError(f"data: X_train ({x_p}) holds NaN or infinite values (row {bad + 1})")
        if task == "regression" and not np.isfinite(ys.astype(np.float64)).all():
            raise InputError("data: y_train holds NaN or infinite values")
        if task == "classification":
            yy = ys.reshape(-1) if ys.ndim > 1 and ys.shape[1:] == (1,) else ys
            if yy.ndim != 1 or not np.all(np.equal(np.mod(yy, 1), 0)) or yy.min() < 0:
                raise InputError("data: y_train must hold class indices 0..K-1 for classification")
        row0 += len(xs)
    Xs, ys_ = data.bounded_sample(seed=0)
    return data, (Xs, ys_, _load_small(raw[2], root, "X_test"), _load_small(raw[3], root, "y_test"))


def with_target_defaults(proj: ProjectConfig, profile: TargetProfile) -> ProjectConfig:
    """What the project file leaves unset comes from the target's export preferences:
    ``compress.quantize`` and ``export.max_batch``."""
    update: dict[str, Any] = {}
    if "max_batch" not in proj.export.model_fields_set:
        update["export"] = proj.export.model_copy(update={"max_batch": profile.export.max_batch})
    if "quantize" not in proj.compress.model_fields_set:
        pref = profile.export.quantization
        update["compress"] = proj.compress.model_copy(
            update={"quantize": "none" if pref == "fp32" else pref})
    return proj.model_copy(update=update) if update else proj


def model_outputs(model: nn.Module, X: np.ndarray, *, who: str, rows: str, verb: str,
                  error: type[TomaEdgeError] = InputError, hint: str = "") -> int:
    """Outputs per row of ``model`` (eval mode, no grad) on two rows of ``X``: one forward
    that makes a wrong input shape or output form a one-line ``error`` ("<who> <verb>
    <rows> of shape ...: <the error>; <hint>") instead of a traceback later."""
    import torch

    tail = f"; {hint}" if hint else ""
    try:
        with torch.no_grad():
            out = model.eval()(torch.as_tensor(np.asarray(X[:2], dtype=np.float32)))
    except Exception as e:  # noqa: BLE001  (the user's forward: any error)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise error(f"{who} {verb} {rows} of shape {tuple(X.shape[1:])}: "
                    f"{type(e).__name__}: {first}{tail}") from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != min(2, len(X)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise error(f"{who} must return a (rows, outputs) tensor, got {got}{tail}")
    return int(out.shape[1])


def load_source(project_path: str | Path | None) -> ModelSource:
    """Resolve the built-in example (None) or a project file into a ModelSource."""
    if project_path is None:
        from .example import ExampleRegressor, make_data

        proj = builtin_project()
        X_tr, y_tr, X_te, y_te = make_data()

        return ModelSource(proj, ExampleRegressor, X_tr, y_tr, X_te, y_te, builtin=True)

    proj = load_project(project_path)
    model_fn = import_callable(proj.model, proj.root, what="model")
    data_fn = import_callable(proj.data, proj.root, what="data")
    try:
        raw = data_fn()
    except Exception as e:
        raise InputError(f"data '{proj.data}' raised {type(e).__name__}: {e}") from e
    training: FileData | None = None
    if isinstance(raw, (tuple, list)) and len(raw) == 4 and _is_path(raw[0]):
        training, raw = _open_training_files(raw, proj.task, proj.root)
    elif isinstance(raw, (tuple, list)) and len(raw) == 4:
        raw = tuple(_load_small(a, proj.root, n) if i >= 2 else a
                    for i, (a, n)
                    in enumerate(zip(raw, ("X_train", "y_train", "X_test", "y_test"))))
    X_tr, y_tr, X_te, y_te, n_classes = _check_data(raw, proj.task)
    if training is not None and proj.task == "classification":
        n_classes = max(n_classes, int(training.labels().max()) + 1)

    def user_factory() -> nn.Module:
        try:
            m = model_fn()
        except Exception as e:
            raise ConfigError(f"model '{proj.model}' raised {type(e).__name__}: {e}") from e
        if not isinstance(m, nn.Module):
            raise ConfigError(f"model '{proj.model}' must return a torch.nn.Module, "
                              f"got {type(m).__name__}")
        return m

    # one forward on two rows: wrong input width or output size fails here, clearly
    n_out = model_outputs(user_factory(), X_tr, who=f"model '{proj.model}'",
                          rows="data rows", verb="cannot take")
    if proj.task == "classification":
        if n_out < n_classes:
            raise InputError(f"model '{proj.model}' outputs {n_out} scores but the labels "
                             f"go up to class {n_classes - 1}")
        n_classes = n_out
    elif n_out != y_tr.shape[1]:
        raise InputError(f"model '{proj.model}' outputs {n_out} values per row "
                         f"but y has {y_tr.shape[1]}")
    classes = list(proj.classes) if proj.classes else [str(i) for i in range(n_classes)]
    if proj.task == "classification" and len(classes) != n_classes:
        raise ConfigError(f"project: 'classes' names {len(classes)} classes "
                          f"but the model outputs {n_classes}")
    return ModelSource(proj, user_factory, X_tr, y_tr, X_te, y_te, classes=classes,
                       training_data=training)
