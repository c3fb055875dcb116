"""The bundle pipeline: a plan, then steps (train or load, cross-validate, choose a variant,
export, verify and measure, write), composed by ``build`` and ``compress_saved``.

    from toma_edge.host import build
    res = build(target="rpi", out="/tmp/b")         # the built-in example
    res.out, res.manifest["metrics"]["shipped"]["test_r2"]
    build(target="rpi4", project="toma-edge.yaml")  # a user's own model

    from toma_edge.host.pipeline import compress_saved
    compress_saved("model.pt", target="rpi4")       # ``toma-edge compress``: a saved model

Each step takes the :class:`Plan` (target profile, project and data, budgets, output
folder) and returns a value the next one needs; an entry point is the steps in order.
The bundle is written through :class:`toma_edge.bundle.BundleWriter`: a temporary folder
beside ``out`` renamed into place only when everything passed, so a failed build leaves
nothing half-written. The test split is only ever scored, never searched or trained on.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from .. import __version__
from .._validation import describe_validation_error
from ..budget import format_size, parse_size
from ..bundle import (
    SCHEMA_VERSION,
    BuildInfo,
    BundleWriter,
    DataInfo,
    Manifest,
    Memory,
    Metrics,
    TargetInfo,
    TensorSpec,
    WrittenBundle,
)
from ..device.adapter import load_program
from ..errors import BudgetError, BundleError, ConfigError, InputError
from ..profiles import TargetProfile, load_profile
from ..progress import NullProgress, Progress, as_progress
from .export import (
    ExportResult,
    Quantization,
    calibration_batches,
    example_rows,
    export_net,
    export_program,
    quantize_model,
)
from .measure import finish_peak_measurement, measure_peaks, start_peak_measurement
from .search import (
    BuildChoice,
    Candidate,
    CompressResult,
    compress,
    preferred_quantization,
    search_for_build,
    tolerance_of,
    validation_split,
)
from .source import ModelSource, load_source, model_outputs, with_target_defaults
from .train import (
    MemoryPolicy,
    Task,
    TrainSpec,
    evaluate,
    evaluate_data,
    fastest_threads,
    kfold_indices,
    loader_budget_bytes,
    predict_numpy,
    train_model,
)
from .verify import Agreement, run_padded, verify_export

__all__ = [
    "BuildResult",
    "Plan",
    "make_plan",
    "build",
    "compress_saved",
    "package",
    "check_model_takes_rows",
    "chance_warnings",
    "eager_model_path",
    "trained_model_path",
    "memory_policy",
    "CrossValidation",
    "train_and_validate",
    "load_saved_model",
    "test_metrics",
    "choose_variant",
    "search_variants",
    "export_variant",
    "Checked",
    "verify_and_measure",
    "verify_program",
    "measure_single",
    "check_fit",
    "bundle_manifest",
    "write_bundle",
    "summary_lines",
]


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    seconds: float
    summary: list[str] = field(default_factory=list)
    archive: Path | None = None
    #: the eager model that model.pte computes (simulated int8 for int8 variants); not saved
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Plan:
    """What a pipeline run works from: the target, the project with its data (target
    defaults applied), the budgets (bytes; latency in ms) and the output folder."""

    profile: TargetProfile
    source: ModelSource
    out: Path
    storage_bytes: int
    train_budget_bytes: int | None
    latency_budget_ms: float | None = None

    @property
    def task(self) -> Task:
        return self.source.project.task

    @property
    def max_batch(self) -> int:
        return self.source.project.export.max_batch

    @property
    def spec(self) -> TrainSpec:
        return TrainSpec.from_config(self.source.project.train, self.task)


def make_plan(
    *,
    target: str = "rpi",
    project: str | Path | None = None,
    out: str | Path | None = None,
    storage_budget: str | int | None = None,
    train_budget: str | int | None = None,
    latency_budget_ms: float | None = None,
    source: ModelSource | None = None,
) -> Plan:
    """Resolve the target profile, the project (None: the built-in example; ``source``:
    one already resolved) and the budgets (None: the target's); ``out`` defaults to
    ``dist/<target>``."""
    profile = load_profile(target)
    storage = (parse_size(storage_budget) if storage_budget is not None
               else profile.storage_budget_bytes)
    train = (parse_size(train_budget, total_bytes=profile.ram_bytes) if train_budget is not None
             else profile.train_budget_bytes)
    src = source if source is not None else load_source(project)
    src.project = with_target_defaults(src.project, profile)
    return Plan(profile=profile, source=src,
                out=Path(out) if out is not None else Path("dist") / profile.name,
                storage_bytes=storage, train_budget_bytes=train,
                latency_budget_ms=latency_budget_ms)


# --- the entry points --------------------------------------------------------------


def build(
    *,
    target: str = "rpi",
    project: str | Path | None = None,
    out: str | Path | None = None,
    storage_budget: str | int | None = None,
    train_budget: str | int | None = None,
    latency_budget_ms: float | None = None,
    memory_log: str | Path | None = None,
    sign_key: str | Path | None = None,
    archive: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Build a bundle for ``target`` from the built-in example or a project file.

    ``memory_log``: write the build's RSS over time as JSONL there, and a PNG of it
    against the training budget beside it (same name, ``.png``).
    """
    plan = make_plan(target=target, project=project, out=out, storage_budget=storage_budget,
                     train_budget=train_budget, latency_budget_ms=latency_budget_ms)
    if memory_log is None:
        return _build(plan, as_progress(progress), sign_key=sign_key, archive=archive)
    return _with_memory_log(plan, Path(memory_log), as_progress(progress),
                            lambda p: _build(plan, p, sign_key=sign_key, archive=archive))


def _build(plan: Plan, progress: Progress, *, sign_key: str | Path | None,
           archive: bool) -> BuildResult:
    t0 = time.perf_counter()
    _import_exporter_in_background()
    with training_threads(plan, progress):
        return _build_steps(plan, progress, t0, sign_key=sign_key, archive=archive)


def _import_exporter_in_background() -> None:
    """Import ExecuTorch's exporter and quantizer (2.5 s of Python) on a thread while
    training runs: training spends most of its time in torch kernels, which release the
    GIL, so the import mostly overlaps it. A later import waits for this one."""
    import importlib
    import threading

    def run() -> None:
        for name in ("executorch.backends.xnnpack.quantizer.xnnpack_quantizer",
                     "executorch.backends.xnnpack.partition.xnnpack_partitioner",
                     "torchao.quantization.pt2e.quantize_pt2e"):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001  (the real import reports it)
                return

    threading.Thread(target=run, name="toma-import-exporter", daemon=True).start()


def _build_steps(plan: Plan, progress: Progress, t0: float, *, sign_key: str | Path | None,
                 archive: bool) -> BuildResult:
    model, cv = train_and_validate(plan, memory_policy(plan, progress), progress)
    reference = {**test_metrics(plan, model), **cv.reference}
    warnings = chance_warnings(plan, reference)
    for w in warnings:
        progress.info(f"warning: {w}")
    choice = choose_variant(plan, model, progress)
    exported = export_variant(plan, choice.model, choice.quantization, progress)
    with BundleWriter(plan.out) as writer:
        checked = verify_and_measure(plan, exported, writer.path, progress)
        shipped = {**checked.metrics, **cv.of(choice.quantization, choice.prune)}
        if choice.shipped is None:  # one allowed variant: measured on this program
            choice = measure_single(plan, choice, exported, checked, shipped, progress)
        check_fit(plan, exported, checked.measured)
        drop = shipped_drop_warning(plan, reference, shipped, choice)
        if drop:
            progress.info(f"warning: {drop}")
            warnings.append(drop)
        manifest = bundle_manifest(
            plan, exported, choice.model, quantization=choice.quantization, prune=choice.prune,
            candidates=choice.candidates, shipped=choice.shipped, reference=reference,
            shipped_metrics=shipped, checked=checked,
            build=dict(train=plan.source.project.train.model_dump(mode="json"),
                       data=_data_info(plan, train_rows=int(plan.source.training.rows)),
                       warnings=tuple(warnings), eager_model=eager_model_path(plan.out).name,
                       **({"trained_model": trained_model_path(plan.out).name}
                          if choice.prune else {})))
        # the shipped variant's eager fp32 model (what model.pte computes, before
        # quantization) and, when it was pruned, the trained model before compression
        saved = [(save_eager_model(choice.model, eager_model_path(plan.out)),
                  eager_model_path(plan.out))]
        if choice.prune:
            saved.append((save_eager_model(model, trained_model_path(plan.out)),
                          trained_model_path(plan.out)))
        bundle = write_bundle(writer, plan, manifest, checked, choice.candidates, choice.shipped,
                              sign_key=sign_key, archive=archive)
    for tmp, final in saved:
        tmp.replace(final)
    res = _result(plan, bundle, t0, exported)
    res.summary.append(f"  eager fp32 model of the shipped variant: {eager_model_path(plan.out)}"
                       " (torch.load it to compare with PyTorch)")
    if choice.prune:
        res.summary.append(f"  trained model before pruning: {trained_model_path(plan.out)} "
                           "(toma-edge compress it again without training)")
    return res


def compress_saved(
    model_path: str | Path,
    *,
    target: str = "rpi",
    project: str | Path | None = None,
    out: str | Path | None = None,
    storage_budget: str | int | None = None,
    latency_budget_ms: float | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """``toma-edge compress``: the search and export alone over a saved, trained model;
    writes a bundle like build's (``dist/<target>/`` by default).

    The project (or the built-in example) gives the data: the search fine-tunes on the
    training rows less a validation split and scores on that split; the test split is
    only reported. ``metrics.reference`` is the saved model on the test split.
    """
    t0 = time.perf_counter()
    prog = as_progress(progress)
    plan = make_plan(target=target, project=project, out=out, storage_budget=storage_budget,
                     latency_budget_ms=latency_budget_ms)
    model = load_saved_model(model_path, plan.source.factory, project=project)
    check_model_takes_rows(model, plan, what=f"{Path(model_path).name}",
                           hint="pass --project with the data it was trained on"
                           if project is None else "is it the project's model?")
    reference = test_metrics(plan, model)
    warnings = [*chance_warnings(plan, reference),
                "the compression search scored candidates on a validation split of the "
                "project's training rows, which the saved model was most likely trained on: "
                "its val_ figures are optimistic; the test_ figures are held out"]
    for w in warnings:
        prog.info(f"note: {w}")
    with training_threads(plan, prog):
        res, data = search_variants(plan, model, prog)
    return _write_searched(plan, res, reference, prog, t0, build=dict(
        command="compress", source_model=str(model_path), data=data, warnings=tuple(warnings)))


def _write_searched(plan: Plan, res: CompressResult, reference: dict[str, float],
                    progress: Progress, t0: float, *, build: dict[str, Any],
                    sign_key: str | Path | None = None, archive: bool = False) -> BuildResult:
    """Verify, measure and write the search's shipped program (compress and package)."""
    with BundleWriter(plan.out) as writer:
        checked = verify_and_measure(plan, res.export, writer.path, progress)
        manifest = bundle_manifest(
            plan, res.export, res.model, quantization=res.shipped.quantization,
            prune=res.shipped.prune, candidates=res.candidates, shipped=res.shipped,
            reference=reference, shipped_metrics=checked.metrics, checked=checked, build=build)
        bundle = write_bundle(writer, plan, manifest, checked, res.candidates, res.shipped,
                              sign_key=sign_key, archive=archive)
    return _result(plan, bundle, t0, res.export)


def package(
    model: nn.Module,
    example_inputs: Any,
    *,
    calibration: Any,
    evaluation: tuple[Any, Any],
    target: str = "rpi",
    out: str | Path | None = None,
    task: Task | None = None,
    classes: list[str] | None = None,
    name: str = "model",
    version: str | None = None,
    quantize: str | list[str] = "auto",
    prune: float | str = 0.0,
    finetune: Callable[[nn.Module], nn.Module] | None = None,
    max_batch: int | None = None,
    verify: dict[str, float] | None = None,
    storage_budget: str | int | None = None,
    latency_budget_ms: float | None = None,
    sign_key: str | Path | None = None,
    archive: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Bundle a model trained in the user's own loop: the same search, verification,
    measurement and bundle writing as build, without training.

        from toma_edge.host import package
        res = package(model, X[:8], calibration=X_train[:256], evaluation=(X_val, y_val),
                      target="rpi4", out="dist/rpi4")   # (N, C, H, W) or (N, T, F) rows too

    ``model``: eager, fp32; a classifier returns logits (the program ends in softmax).
    ``example_inputs``: a few input rows (a tensor or array, or a 1-tuple of one): their
    shape after the batch is the program's row shape. ``calibration``: rows for int8
    calibration (a few hundred, from the training data). ``evaluation``: held-out
    ``(X, y)``; half (stratified) scores the candidates, the other half is the bundle's
    ``test_`` metrics. ``task``: inferred when None (integer labels and more than one
    output: classification). ``quantize``: a kind, ``auto`` or a list of kinds.
    ``prune``: a ratio or ``auto``; pruned copies are fine-tuned by ``finetune(model) ->
    model`` (required when pruning: only the caller knows how to train the model).
    ``verify``: ``{"min_agreement": 0.97, "max_error": 0.05}`` overrides.
    """
    t0 = time.perf_counter()
    prog = as_progress(progress)
    plan, choose_rows = _package_plan(
        model, example_inputs, calibration, evaluation, target=target, out=out, task=task,
        classes=classes, name=name, version=version, quantize=quantize, prune=prune,
        max_batch=max_batch, verify=verify, storage_budget=storage_budget,
        latency_budget_ms=latency_budget_ms)
    if plan.source.project.compress.prune != 0.0 and finetune is None:
        raise ConfigError("pruning needs fine-tuning in your own loop: pass "
                          "finetune=callable(model) -> model, or prune=0.0")
    model = model.eval()
    reference = test_metrics(plan, model)
    warnings = chance_warnings(plan, reference)
    for w in warnings:
        prog.info(f"warning: {w}")
    src = plan.source
    Xc, yc = choose_rows
    prog.phase("searching compression variants")
    res = compress(model, src.project.compress, task=plan.task, train=(src.X_train, src.y_train),
                   val=(Xc, yc), target=plan.profile, max_batch=plan.max_batch,
                   storage_budget=plan.storage_bytes, latency_budget_ms=plan.latency_budget_ms,
                   spec=plan.spec, progress=prog, finetune_fn=finetune)
    prog.done()
    prog.info("compression candidates (* shipped):\n" + res.table())
    data = DataInfo(train_rows=0, test_rows=len(src.X_test), validation_rows=len(Xc),
                    builtin_example=False)
    return _write_searched(plan, res, reference, prog, t0, sign_key=sign_key, archive=archive,
                           build=dict(command="package", data=data, warnings=tuple(warnings)))


def _rows(a: Any, what: str) -> np.ndarray:
    """Rows as a float32 array (N, ...), from a tensor, an array or a 1-tuple of one."""
    if isinstance(a, (tuple, list)) and len(a) == 1 and not np.isscalar(a[0]):
        a = a[0]
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    try:
        x = np.asarray(a, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: not numeric rows ({e})") from e
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"{what}: needs rows of shape (N, features...), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{what}: holds NaN or infinite values")
    return x


def _package_plan(model: nn.Module, example_inputs: Any, calibration: Any,
                  evaluation: tuple[Any, Any], *, target: str, out: str | Path | None,
                  task: Task | None, classes: list[str] | None, name: str, version: str | None,
                  quantize: str | list[str], prune: float | str, max_batch: int | None,
                  verify: dict[str, float] | None, storage_budget: str | int | None,
                  latency_budget_ms: float | None
                  ) -> tuple[Plan, tuple[np.ndarray, np.ndarray]]:
    """package()'s inputs checked (one-line errors) into a Plan, and the half of the
    evaluation rows that scores candidates."""
    from ..project import ProjectConfig

    if not isinstance(model, nn.Module):
        raise InputError(f"model: a torch.nn.Module is needed, got {type(model).__name__}")
    ex = _rows(example_inputs, "example_inputs")
    X_cal = _rows(calibration, "calibration")
    if not isinstance(evaluation, (tuple, list)) or len(evaluation) != 2:
        raise InputError("evaluation: pass (X, y), held-out rows and their targets")
    X_ev = _rows(evaluation[0], "evaluation X")
    y_ev = np.asarray(evaluation[1].detach().cpu().numpy()
                      if isinstance(evaluation[1], torch.Tensor) else evaluation[1])
    for what, x in (("calibration", X_cal), ("evaluation X", X_ev)):
        if x.shape[1:] != ex.shape[1:]:
            raise InputError(f"{what}: rows of shape {x.shape[1:]} but example_inputs has "
                             f"{ex.shape[1:]}")
    if len(y_ev) != len(X_ev):
        raise InputError(f"evaluation: {len(X_ev)} rows in X but {len(y_ev)} targets in y")
    out_shape = (len(ex[:2]), model_outputs(model, ex, who="the model", verb="does not run on",
                                            rows="example_inputs"))
    if task is None:
        task = ("classification" if np.issubdtype(y_ev.dtype, np.integer) and out_shape[-1] > 1
                else "regression")
    if task == "classification":
        y_ev = y_ev.reshape(-1)
        if not np.issubdtype(y_ev.dtype, np.integer) or y_ev.min() < 0 \
                or y_ev.max() >= out_shape[-1]:
            raise InputError(f"evaluation y: class indices 0..{out_shape[-1] - 1} needed for a "
                             f"model with {out_shape[-1]} outputs")
    else:
        y_ev = y_ev.astype(np.float32).reshape(len(y_ev), -1)
        if y_ev.shape[1] != out_shape[-1]:
            raise InputError(f"evaluation y: {y_ev.shape[1]} targets per row but the model "
                             f"gives {out_shape[-1]} outputs")
    n_classes = out_shape[-1] if task == "classification" else 0
    if classes is not None and len(classes) != n_classes:
        raise InputError(f"classes: {len(classes)} names for {n_classes} outputs")
    compress_cfg: dict[str, Any] = {"quantize": quantize, "prune": prune}
    if verify:
        compress_cfg["verify"] = verify
    raw: dict[str, Any] = {"name": name, "task": task, "version": version,
                           "model": "toma_edge.host.pipeline:package",
                           "data": "toma_edge.host.pipeline:package",
                           "train": {"folds": 0}, "compress": compress_cfg}
    if max_batch is not None:
        raw["export"] = {"max_batch": max_batch}
    try:
        proj = ProjectConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"package: {describe_validation_error(e)}") from e
    # half the evaluation rows choose, the other half report (both when too few to split)
    if len(X_ev) >= 40:
        choose_idx, report_idx = validation_split(len(X_ev), task=task, y=y_ev, fraction=0.5)
    else:
        choose_idx = report_idx = np.arange(len(X_ev))
    y_cal = (np.zeros(len(X_cal), np.int64) if task == "classification"
             else np.zeros((len(X_cal), out_shape[-1]), np.float32))  # unused: no training

    def factory() -> nn.Module:
        import copy

        return copy.deepcopy(model)

    src = ModelSource(proj, factory, X_cal, y_cal, X_ev[report_idx], y_ev[report_idx],
                      classes=list(classes) if classes else [str(i) for i in range(n_classes)])
    plan = make_plan(target=target, out=out, storage_budget=storage_budget,
                     latency_budget_ms=latency_budget_ms, source=src)
    return plan, (X_ev[choose_idx], y_ev[choose_idx])


# --- the steps ----------------------------------------------------------------------


@contextlib.contextmanager
def training_threads(plan: Plan, progress: Progress) -> Iterator[None]:
    """Run the build on the thread count a training step of this model is fastest on
    here and now (measured: a tiny model on a busy 2-core machine is many times faster on
    one thread than on two); torch's count is restored after."""
    src = plan.source
    before = torch.get_num_threads()
    choice = fastest_threads(src.factory(), src.X_train, src.y_train, plan.spec)
    if choice.step_ms:
        progress.info(choice.describe())
    torch.set_num_threads(choice.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eager_model_path(out: Path) -> Path:
    """Where build saves the shipped variant's eager fp32 model (pruned and fine-tuned when
    the search pruned; what model.pte computes before quantization): beside the bundle
    folder, named after it (``dist/rpi4`` -> ``dist/rpi4.eager.pt``)."""
    return out.parent / f"{out.name}.eager.pt"


def trained_model_path(out: Path) -> Path:
    """Where build saves the trained model before pruning, when the shipped variant is
    pruned (``dist/rpi4.trained.pt``): the input of ``toma-edge compress``."""
    return out.parent / f"{out.name}.trained.pt"


def save_eager_model(model: nn.Module, path: Path) -> Path:
    """``torch.save`` the whole module to a temporary file beside ``path`` (renamed into
    place once the bundle is written); ``toma-edge compress`` and ``torch.load`` read it.
    A module torch cannot pickle as it is (weight-norm parametrizations and their
    state-dict hooks, local functions) is saved with its reparametrizations folded into
    plain weights (the same function); one that still cannot be pickled, as its
    state_dict (load it into the project's factory)."""
    import copy

    from .prune import fold_reparametrizations

    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(model, tmp)
        return tmp
    except Exception:  # noqa: BLE001  (pickling fails as RuntimeError, AttributeError, ...)
        pass
    folded = fold_reparametrizations(copy.deepcopy(model))
    for m in folded.modules():  # state-dict hooks of folded weight norm: local functions
        for hooks in (m._load_state_dict_pre_hooks, m._state_dict_hooks,
                      m._state_dict_pre_hooks, m._load_state_dict_post_hooks):
            for key, hook in list(hooks.items()):
                try:
                    pickle.dumps(hook)
                except Exception:  # noqa: BLE001
                    del hooks[key]
    try:
        torch.save(folded, tmp)
    except Exception:  # noqa: BLE001  (still unpicklable: the weights, for the factory)
        torch.save(model.state_dict(), tmp)
    return tmp


def shipped_drop_warning(plan: Plan, reference: dict[str, float], shipped: dict[str, float],
                         choice: BuildChoice) -> str:
    """A warning when the shipped program scores clearly below the trained model on the
    test split (more than 2 accuracy points or 0.02 R2): the search chose on a validation
    split, which a small data set makes noisy. Reported, never used to choose."""
    name = "test_accuracy" if plan.task == "classification" else "test_r2"
    if name not in reference or name not in shipped:
        return ""
    drop = reference[name] - shipped[name]
    if drop <= 0.02:
        return ""
    return (f"the shipped variant ({choice.quantization} pruned {choice.prune:.0%}) scores "
            f"{name} {shipped[name]:.3f} on the test split, {drop:.3f} below the trained "
            f"model's {reference[name]:.3f}; the search chose it on a validation split of the "
            "training rows: allow less compression (compress.prune, compress.quantize), or "
            "give more rows")


def chance_warnings(plan: Plan, reference: dict[str, float]) -> list[str]:
    """A warning when the trained fp32 model is no better than guessing on the test
    split: accuracy within 2 points of always answering the most common class, or R2
    below 0.05. Shipping such a model is allowed (it may be a placeholder), never silent."""
    src = plan.source
    if plan.task == "classification" and "test_accuracy" in reference:
        labels = np.asarray(src.y_test).reshape(-1)
        if not len(labels):
            return []
        _, counts = np.unique(labels, return_counts=True)
        guess = float(counts.max() / len(labels))
        acc = reference["test_accuracy"]
        if acc <= guess + 0.02:
            return [f"the trained model is at chance level: test accuracy {acc:.3f} against "
                    f"{guess:.3f} for always answering the most common class; check the data "
                    "and labels, train longer (train.epochs) or change train.lr"]
    if plan.task == "regression" and reference.get("test_r2", 1.0) < 0.05:
        return [f"the trained model explains almost none of the target: test R2 "
                f"{reference['test_r2']:.3f}; check the data, train longer (train.epochs) or "
                "change train.lr"]
    return []


def memory_policy(plan: Plan, progress: Progress) -> MemoryPolicy:
    """Every training run fits its steps into the training budget (micro-batches,
    checkpointing), as the project's ``train:`` memory keys allow."""
    train = plan.source.project.train
    return MemoryPolicy(train_budget_bytes=plan.train_budget_bytes, micro_batch=train.micro_batch,
                        checkpointing=train.checkpointing, on_info=progress.info)


@dataclass(frozen=True)
class CrossValidation:
    """Mean fold metrics (``cv_*``) of the fp32 model and of ``quantization``'s variant."""

    quantization: Quantization
    reference: dict[str, float]
    quantized: dict[str, float]

    def of(self, quantization: Quantization, prune: float) -> dict[str, float]:
        """The metrics of that variant, when cross-validation ran it (else none)."""
        return self.quantized if quantization == self.quantization and prune == 0.0 else {}


def train_and_validate(plan: Plan, memory: MemoryPolicy, progress: Progress
                       ) -> tuple[nn.Module, CrossValidation]:
    """Cross-validate on the training split (``train.folds`` folds, the fp32 model and
    the target's preferred quantization of it), then train on all training rows."""
    src, spec, task = plan.source, plan.spec, plan.task
    folds, seed = src.project.train.folds, src.project.train.seed
    if folds and "folds" not in src.project.train.model_fields_set and not src.builtin:
        progress.info(f"cross-validating on {folds} folds (the default; set train.folds: 0 "
                      "to skip it, or fewer to build faster)")
    kind = preferred_quantization(src.project.compress.quantize, plan.profile)
    cal_batches = src.project.compress.calibration_batches
    progress.phase("training", total=spec.epochs * (folds + 1))
    # src.training: the arrays, or file-backed rows read through a budgeted loader (folds
    # are subsets of it, scored by streaming; quantized CV calibrates on a bounded sample)
    data = src.training
    budget = loader_budget_bytes(memory)
    cv_ref: list[dict[str, float]] = []
    cv_q: list[dict[str, float]] = []
    if folds:
        labels = data.labels() if task == "classification" else None
        for tr_idx, va_idx in kfold_indices(data.rows, folds, seed=seed, task=task, y=labels):
            torch.manual_seed(seed)
            m = train_model(src.factory(), data.subset(tr_idx), None, spec,
                            progress=lambda *_: progress.advance(), memory=memory)
            net = export_net(m, task)
            val = data.subset(va_idx)
            cv_ref.append(evaluate_data(functools.partial(predict_numpy, net), val, task,
                                        prefix="cv_", budget_bytes=budget))
            if kind != "fp32":
                X_cal = data.subset(tr_idx).calibration_rows(cal_batches * 32)
                qp = _predict_quantized(m, task, X_cal, kind, plan.max_batch, cal_batches)
                cv_q.append(evaluate_data(qp, val, task, prefix="cv_", budget_bytes=budget))
            else:
                cv_q.append(cv_ref[-1])
    torch.manual_seed(seed)
    model = train_model(src.factory(), data, None, spec, progress=lambda *_: progress.advance(),
                        memory=memory)
    progress.done()
    return model, CrossValidation(kind, _mean_metrics(cv_ref), _mean_metrics(cv_q))


def load_saved_model(path: str | Path, factory: Callable[[], nn.Module], *,
                     project: str | Path | None = None) -> nn.Module:
    """A model saved with ``torch.save``: the module itself, or a state_dict for ``factory()``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such model file; save one with torch.save(model, '{p.name}')")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:  # the pickled class's module is not importable here
        where = ("the project's folder does not hold it either" if project is not None
                 else "pass --project with the project file whose folder holds that module")
        raise ConfigError(f"{p}: the saved module's class comes from module '{e.name}', which "
                          f"is not importable here; {where} (or save a state_dict and pass "
                          "--project with its model factory)") from e
    except Exception as e:  # pickle and zip errors of many kinds
        raise InputError(f"{p}: cannot load it with torch.load ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); save the module or its "
                         "state_dict with torch.save") from e
    if isinstance(obj, nn.Module):
        return obj.eval()
    if isinstance(obj, dict):
        model = factory()
        try:
            model.load_state_dict(obj)
        except (RuntimeError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()
            why = first[1].strip() if len(first) > 1 else first[0] if first else type(e).__name__
            raise ConfigError(
                f"{p}: the state_dict does not fit the project's model ({why}); "
                "pass --project with the factory that built it, or save the whole module"
            ) from e
        return model.eval()
    raise InputError(f"{p}: holds a {type(obj).__name__}, not a torch.nn.Module or a state_dict")


def check_model_takes_rows(model: nn.Module, plan: Plan, *, what: str, hint: str) -> None:
    """ConfigError (one line) unless ``model`` runs on two of the plan's training rows and
    gives what the task needs: (N, K) with K at least the number of classes, or (N, T)
    with T the targets per row."""
    src = plan.source
    data = "the built-in example" if src.builtin else "the project's data"
    n_out = model_outputs(model, src.X_train, who=what, verb="does not take",
                          rows=f"{data}'s rows", error=ConfigError, hint=hint)
    if plan.task == "classification":
        k = len(src.classes) or int(np.max(src.y_train)) + 1
        if n_out < k:
            raise ConfigError(f"{what} gives {n_out} outputs but {data} has {k} classes; "
                              f"{hint}")
    else:
        t = int(np.asarray(src.y_train).reshape(len(src.y_train), -1).shape[1])
        if n_out != t:
            raise ConfigError(f"{what} gives {n_out} outputs but {data} has {t} targets "
                              f"per row; {hint}")


def test_metrics(plan: Plan, model: nn.Module) -> dict[str, float]:
    """The eager fp32 model's ``test_*`` metrics on the test split."""
    net = export_net(model, plan.task)
    src = plan.source
    return evaluate(lambda x: predict_numpy(net, x), src.X_test, src.y_test, plan.task,
                    prefix="test_")


def choose_variant(plan: Plan, model: nn.Module, progress: Progress) -> BuildChoice:
    """The compression search over the variants the project allows, scored on a validation
    split of the training rows; the winner is applied to ``model`` (see search_for_build)."""
    src = plan.source
    progress.phase("searching compression variants")
    choice = search_for_build(src.factory, model, src.project.compress, task=plan.task,
                              X_train=src.X_train, y_train=src.y_train, spec=plan.spec,
                              profile=plan.profile, storage_bytes=plan.storage_bytes,
                              latency_budget_ms=plan.latency_budget_ms, max_batch=plan.max_batch)
    progress.done()
    if choice.search is not None:
        progress.info("compression candidates (* shipped):\n" + choice.table())
    return choice


def search_variants(plan: Plan, model: nn.Module, progress: Progress
                    ) -> tuple[CompressResult, DataInfo]:
    """The compression search over a trained ``model``: fine-tuned on the training rows
    less a validation split, scored on that split; the result and the rows it used."""
    src = plan.source
    fit, val = validation_split(len(src.X_train), task=plan.task, y=src.y_train,
                                seed=plan.spec.seed)
    res = compress(model, src.project.compress, task=plan.task,
                   train=(src.X_train[fit], src.y_train[fit]),
                   val=(src.X_train[val], src.y_train[val]),
                   target=plan.profile, max_batch=plan.max_batch, storage_budget=plan.storage_bytes,
                   latency_budget_ms=plan.latency_budget_ms, spec=plan.spec, progress=progress)
    progress.info("compression candidates (* shipped):\n" + res.table())
    return res, _data_info(plan, train_rows=len(fit), validation_rows=len(val))


def export_variant(plan: Plan, model: nn.Module, quantization: Quantization,
                   progress: Progress) -> ExportResult:
    """Quantize (calibrated on training rows) and export ``model`` to an ExecuTorch program."""
    src = plan.source
    net = export_net(model, plan.task)
    progress.phase(f"quantizing ({quantization}) and exporting")
    # >= 16 example rows: a 2-row example lets export guard conv models to batch <= 15
    example = torch.as_tensor(src.X_train[: max(2, min(32, plan.max_batch))])
    res = export_program(net, example, max_batch=plan.max_batch, quantize=quantization,
                         calibration=calibration_batches(src.X_train,
                                                         src.project.compress.calibration_batches))
    progress.done()
    return res


@dataclass(frozen=True)
class Checked:
    """A program verified in the runtime: model.pte's path, the largest difference from
    the eager model, its test predictions and ``test_*`` metrics, its measured peaks."""

    pte_path: Path
    verify_max_abs_diff: float
    test_pred: np.ndarray
    metrics: dict[str, float]
    measured: dict[str, Any]
    #: what the comparison with the eager model measured (top-1 agreement, error, ...)
    verify: dict[str, float] = field(default_factory=dict)


def verify_and_measure(plan: Plan, exported: ExportResult, folder: Path,
                       progress: Progress) -> Checked:
    """Write model.pte into ``folder``, load it in the ExecuTorch runtime, check it agrees
    with the eager model at several batch sizes, score it on the test split and measure
    its peak per batch size in a fresh device process (a fixed-batch program at its batch:
    one row costs that many)."""
    src = plan.source
    pte_path = folder / "model.pte"
    pte_path.write_bytes(exported.pte)
    progress.phase("verifying in the ExecuTorch runtime")
    program = load_program(pte_path, threads=1)  # loaded once: verify, metrics, plot
    fixed = exported.fixed_batch
    try:
        agreement = verify_program(plan, exported, program)
        if agreement.outputs is not None and len(agreement.outputs) == len(src.X_test):
            pred = agreement.outputs  # every test row ran once in the check
        else:
            pred = run_padded(program, src.X_test, fixed or plan.max_batch,
                              fixed=fixed is not None)
    finally:
        program.close()
    metrics = evaluate(lambda x: pred, src.X_test, src.y_test, plan.task, prefix="test_")
    progress.phase("measuring memory per batch size")
    if fixed:
        measured = finish_peak_measurement(start_peak_measurement(pte_path, (fixed,)))
        peak = measured["measured_peak_bytes"][str(fixed)]
        measured["measured_peak_bytes"] = {"1": peak, str(fixed): peak}
    else:
        measured = measure_peaks(pte_path, plan.max_batch)
    progress.done()
    return Checked(pte_path, agreement.max_abs_diff, pred, metrics, measured,
                   agreement.figures())


def verify_program(plan: Plan, res: ExportResult, program: Any) -> Agreement:
    """Run the test rows (at most 2048) through the loaded program at several batch sizes and
    compare with the eager model by what the task cares about (``compress.verify``);
    BundleError with the reason when it disagrees or fails."""
    src = plan.source
    n = len(src.X_test)
    # every test row when there are at most 2048 (the outputs are the test predictions),
    # else 2048 of them drawn at random
    pick = (np.arange(n) if n <= 2048
            else np.sort(np.random.default_rng(1).choice(n, size=2048, replace=False)))
    agreement = verify_export(program, res, src.X_test[pick], task=plan.task,
                              max_batch=plan.max_batch, y=np.asarray(src.y_test)[pick],
                              tolerance=tolerance_of(src.project.compress))
    if not agreement.ok:
        raise BundleError(f"the exported {res.quantization} program {agreement.reason}; not "
                          "shipping it (compress.verify sets how close it must be)")
    return agreement


def measure_single(plan: Plan, choice: BuildChoice, exported: ExportResult, checked: Checked,
                   shipped_metrics: dict[str, float], progress: Progress) -> BuildChoice:
    """The one allowed variant as a candidate: measured on the exported program, scored by
    its cross-validation metric (none without folds). BudgetError when it does not fit."""
    metric = "cv_r2" if plan.task == "regression" else "cv_accuracy"
    measured = checked.measured
    choice = choice.measure_single(
        checked.pte_path, planned_bytes=exported.planned_bytes,
        peak_bytes=int(measured["measured_peak_bytes"]["1"]), adapter=measured["adapter"],
        profile=plan.profile, storage_bytes=plan.storage_bytes,
        latency_budget_ms=plan.latency_budget_ms, metric=metric, value=shipped_metrics.get(metric),
        fixed_batch=exported.fixed_batch)
    progress.info("compression candidates (* shipped):\n" + choice.table())
    return choice


def check_fit(plan: Plan, exported: ExportResult, measured: dict[str, Any]) -> None:
    """BudgetError unless model.pte fits the storage budget and model.pte plus its batch-1
    peak fit the inference budget less the profile's expected baseline."""
    profile, storage = plan.profile, plan.storage_bytes
    pte_bytes = len(exported.pte)
    peak1 = int(measured["measured_peak_bytes"]["1"])
    working = profile.working_budget_bytes(measured["adapter"])
    if pte_bytes > storage:
        raise BudgetError(
            f"model.pte is {format_size(pte_bytes)}, over the {format_size(storage)} storage "
            f"budget of {profile.name} by {format_size(pte_bytes - storage)}; "
            "compress more (compress.quantize, compress.prune) or raise --storage-budget"
        )
    if pte_bytes + peak1 > working:
        raise BudgetError(
            f"the model needs {format_size(pte_bytes + peak1)} at batch 1 but {profile.name} "
            f"leaves {format_size(working)} (budget {format_size(profile.memory_budget_bytes)} "
            f"less baseline {format_size(profile.baseline_bytes(measured['adapter']))}); "
            "compress the model or pick a larger target"
        )


def bundle_manifest(
    plan: Plan,
    exported: ExportResult,
    model: nn.Module,
    *,
    quantization: Quantization,
    prune: float,
    candidates: tuple[Candidate, ...],
    shipped: Candidate | None,
    reference: dict[str, float],
    shipped_metrics: dict[str, float],
    checked: Checked,
    build: dict[str, Any],
) -> Manifest:
    """The manifest for a verified, measured program (``files`` filled by the writer)."""
    src, profile = plan.source, plan.profile
    proj = src.project
    now = _dt.datetime.now(_dt.timezone.utc)
    rows = example_rows(torch.as_tensor(src.X_test[:2]), 2, exported.fixed_batch)
    n_out = int(exported.reference(rows).shape[1])
    fixed = exported.fixed_batch
    weights = sum(p.numel() for p in model.parameters()) * (1 if quantization != "fp32" else 4)
    extra: dict[str, Any] = {"classes": tuple(src.classes)} if proj.task == "classification" else {}
    measured = checked.measured
    try:
        return Manifest(
            schema_version=SCHEMA_VERSION,
            name=proj.name,
            version=proj.version or now.strftime("%Y.%m.%d-%H%M%S"),
            task=proj.task,
            target=TargetInfo(name=profile.name, arch=profile.arch,
                              memory_budget_bytes=profile.memory_budget_bytes,
                              storage_budget_bytes=plan.storage_bytes,
                              baseline_rss_bytes=dict(profile.baseline_rss_bytes),
                              threads=profile.threads),
            inputs=(TensorSpec(name="x", shape=(-1, *src.X_train.shape[1:]), dtype="float32"),),
            outputs=(TensorSpec(name="y" if proj.task == "regression" else "probabilities",
                                shape=(-1, n_out), dtype="float32"),),
            max_batch=fixed or proj.export.max_batch,
            export_batch=fixed,
            shipped=quantization,
            compression={"quantization": quantization, "prune": prune},
            candidates=tuple(c.entry(shipped=c is shipped) for c in candidates),
            batch_dependent=quantization == "int8-dynamic",
            memory=Memory(pte_bytes=len(exported.pte), planned_bytes=exported.planned_bytes,
                          weights_bytes=int(weights),
                          measured_peak_bytes={k: int(v) for k, v
                                               in measured["measured_peak_bytes"].items()}),
            metrics=Metrics(reference=reference, shipped=shipped_metrics),
            files={},
            versions=_versions(),
            created=now.isoformat(timespec="seconds"),
            build=BuildInfo(measured_with=measured["adapter"],
                            verify_max_abs_diff=checked.verify_max_abs_diff,
                            verify=checked.verify or None, **build),
            **extra,
        )
    except ValidationError as e:  # the format we promise, checked before anything is written
        raise BundleError(f"manifest.json: {' '.join(describe_validation_error(e).split())}") from e


def write_bundle(writer: BundleWriter, plan: Plan, manifest: Manifest, checked: Checked,
                 candidates: tuple[Candidate, ...], shipped: Candidate | None, *,
                 sign_key: str | Path | None = None, archive: bool = False) -> WrittenBundle:
    """The plots beside model.pte, then the manifest, signature, rename and archive."""
    from .plots import write_plots

    src = plan.source
    write_plots(writer.path, task=plan.task, y_true=src.y_test, y_pred=checked.test_pred,
                candidates=candidates, shipped=shipped, classes=src.classes)
    return writer.commit(manifest, sign_key=sign_key, archive=archive)


# --- helpers ------------------------------------------------------------------------


def _data_info(plan: Plan, *, train_rows: int, validation_rows: int | None = None) -> DataInfo:
    extra = {} if validation_rows is None else {"validation_rows": int(validation_rows)}
    return DataInfo(train_rows=int(train_rows), test_rows=int(len(plan.source.X_test)),
                    builtin_example=plan.source.builtin, **extra)


def _result(plan: Plan, bundle: WrittenBundle, t0: float, exported: ExportResult) -> BuildResult:
    secs = time.perf_counter() - t0
    manifest = bundle.manifest.model_dump(mode="json", exclude_unset=True)
    return BuildResult(out=bundle.path, manifest=manifest,
                       seconds=secs, summary=summary_lines(bundle.manifest, plan.profile, secs),
                       archive=bundle.archive, reference=exported.reference)


def _versions() -> dict[str, str]:
    return {"toma_edge": __version__, "torch": torch.__version__.split("+")[0],
            "executorch": metadata.version("executorch")}


def _predict_quantized(model: nn.Module, task: str, X_cal: np.ndarray, kind: Quantization,
                       max_batch: int, n_batches: int) -> Callable[[np.ndarray], np.ndarray]:
    net = export_net(model, task)
    q = quantize_model(net, torch.as_tensor(X_cal[:2]), kind=kind, max_batch=max_batch,
                       calibration=calibration_batches(X_cal, n_batches))

    def predict(X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([q(torch.as_tensor(X[i : i + max_batch])).numpy()
                                   for i in range(0, len(X), max_batch)])

    return predict


def _mean_metrics(ms: list[dict[str, float]]) -> dict[str, float]:
    if not ms:
        return {}
    return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}


def _with_memory_log(plan: Plan, log_path: Path, progress: Progress,
                     run: Callable[[Progress], BuildResult]) -> BuildResult:
    """``run`` under a memory monitor that logs RSS to ``log_path`` (each phase marked)
    and plots it against the training budget beside it."""
    from ..probes import MemoryMonitor
    from .plots import plot_memory_log

    budget = plan.train_budget_bytes
    with MemoryMonitor(interval_s=0.05, log_path=log_path, budget_bytes=budget) as mon:
        res = run(_Marking(progress, mon.mark))
    png = plot_memory_log(log_path, log_path.with_suffix(".png"), budget,
                          title=f"toma-edge build --target {plan.profile.name}: RSS over time")
    res.summary.append(f"  memory log {log_path} (peak RSS {format_size(mon.peak_bytes)}"
                       + (f" against a {format_size(budget)} training budget" if budget else "")
                       + f"), plot {png}")
    return res


class _Marking(NullProgress):
    """Passes progress on and names each phase in the memory log."""

    def __init__(self, inner: Progress, mark: Callable[[str], None]) -> None:
        self.inner, self.mark = inner, mark

    def phase(self, name: str, total: int | None = None) -> None:
        self.mark(name)
        self.inner.phase(name, total)

    def advance(self, n: int = 1, total: int | None = None) -> None:
        self.inner.advance(n, total)

    def done(self) -> None:
        self.inner.done()

    def info(self, msg: str) -> None:
        self.inner.info(msg)


def summary_lines(m: Manifest, profile: TargetProfile, seconds: float) -> list[str]:
    """The lines ``toma-edge build`` prints: metrics, sizes, what the budget leaves."""
    ref, shp = m.metrics.reference, m.metrics.shipped
    names = (["cv_rmse", "cv_r2", "test_rmse", "test_r2"] if m.task == "regression"
             else ["cv_accuracy", "test_accuracy"])
    lines = [f"built {m.name} {m.version} for {profile.name} in {seconds:.1f} s"]
    for w in (m.build.warnings if m.build else ()):
        lines.append(f"  warning: {w}")
    lines.append(f"  {'':10s}" + "".join(f"{n:>15s}" for n in names))
    for label, mm in (("fp32", ref), (m.shipped, shp)):
        lines.append(f"  {label:10s}"
                     + "".join(f"{mm[n]:15.4f}" if n in mm else f"{'-':>15s}" for n in names))
    mem = m.memory
    peak = mem.measured_peak_bytes[str(m.max_batch)]
    lines.append(
        f"  model.pte {format_size(mem.pte_bytes)} (storage budget "
        f"{format_size(m.target.storage_budget_bytes or 0)}); planned arena "
        f"{format_size(mem.planned_bytes)} at batch {m.max_batch}; measured peak "
        f"{format_size(peak)} at batch {m.max_batch}"
    )
    base = profile.baseline_bytes(m.build.measured_with if m.build else "native")
    lines.append(
        f"  inference budget {format_size(profile.memory_budget_bytes)}: "
        f"baseline {format_size(base)}"
        f" + model {format_size(mem.pte_bytes + peak)} leaves "
        f"{format_size(profile.memory_budget_bytes - base - mem.pte_bytes - peak)}"
    )
    return lines
