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

import datetime as _dt
import functools
import time
from collections.abc import Callable
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
    export_net,
    export_program,
    quantize_model,
    run_rows,
)
from .measure import measure_peaks
from .search import (
    BuildChoice,
    Candidate,
    CompressResult,
    compress,
    preferred_quantization,
    search_for_build,
    validation_split,
)
from .source import ModelSource, load_source, with_target_defaults
from .train import (
    MemoryPolicy,
    Task,
    TrainSpec,
    evaluate,
    evaluate_data,
    kfold_indices,
    loader_budget_bytes,
    predict_numpy,
    train_model,
)

__all__ = [
    "BuildResult",
    "Plan",
    "make_plan",
    "build",
    "compress_saved",
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
) -> Plan:
    """Resolve the target profile, the project (None: the built-in example) and the
    budgets (None: the target's); ``out`` defaults to ``dist/<target>``."""
    profile = load_profile(target)
    storage = (parse_size(storage_budget) if storage_budget is not None
               else profile.storage_budget_bytes)
    train = (parse_size(train_budget, total_bytes=profile.ram_bytes) if train_budget is not None
             else profile.train_budget_bytes)
    src = load_source(project)
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
    model, cv = train_and_validate(plan, memory_policy(plan, progress), progress)
    reference = {**test_metrics(plan, model), **cv.reference}
    choice = choose_variant(plan, model, progress)
    exported = export_variant(plan, choice.model, choice.quantization, progress)
    with BundleWriter(plan.out) as writer:
        checked = verify_and_measure(plan, exported, writer.path, progress)
        shipped = {**checked.metrics, **cv.of(choice.quantization, choice.prune)}
        if choice.shipped is None:  # one allowed variant: measured on this program
            choice = measure_single(plan, choice, exported, checked, shipped, progress)
        check_fit(plan, exported, checked.measured)
        manifest = bundle_manifest(
            plan, exported, choice.model, quantization=choice.quantization, prune=choice.prune,
            candidates=choice.candidates, shipped=choice.shipped, reference=reference,
            shipped_metrics=shipped, checked=checked,
            build=dict(train=plan.source.project.train.model_dump(mode="json"),
                       data=_data_info(plan, train_rows=int(plan.source.training.rows))))
        bundle = write_bundle(writer, plan, manifest, checked, choice.candidates, choice.shipped,
                              sign_key=sign_key, archive=archive)
    return _result(plan, bundle, t0, exported)


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
    model = load_saved_model(model_path, plan.source.factory)
    reference = test_metrics(plan, model)
    res, data = search_variants(plan, model, prog)
    with BundleWriter(plan.out) as writer:
        checked = verify_and_measure(plan, res.export, writer.path, NullProgress())
        manifest = bundle_manifest(
            plan, res.export, res.model, quantization=res.shipped.quantization,
            prune=res.shipped.prune, candidates=res.candidates, shipped=res.shipped,
            reference=reference, shipped_metrics=checked.metrics, checked=checked,
            build=dict(command="compress", source_model=str(model_path), data=data))
        bundle = write_bundle(writer, plan, manifest, checked, res.candidates, res.shipped)
    return _result(plan, bundle, t0, res.export)


# --- the steps ----------------------------------------------------------------------


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


def load_saved_model(path: str | Path, factory: Callable[[], nn.Module]) -> nn.Module:
    """A model saved with ``torch.save``: the module itself, or a state_dict for ``factory()``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such model file; save one with torch.save(model, '{p.name}')")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
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


def verify_and_measure(plan: Plan, exported: ExportResult, folder: Path,
                       progress: Progress) -> Checked:
    """Write model.pte into ``folder``, load it in the ExecuTorch runtime, check it agrees
    with the eager model, score it on the test split and measure its peak per batch size
    in a fresh device process."""
    src = plan.source
    pte_path = folder / "model.pte"
    pte_path.write_bytes(exported.pte)
    progress.phase("verifying in the ExecuTorch runtime")
    program = load_program(pte_path, threads=1)  # loaded once: verify, metrics, plot
    diff = verify_program(src, exported, program, plan.max_batch)
    pred = run_rows(program, src.X_test, plan.max_batch)
    del program
    metrics = evaluate(lambda x: pred, src.X_test, src.y_test, plan.task, prefix="test_")
    progress.phase("measuring memory per batch size")
    measured = measure_peaks(pte_path, plan.max_batch)
    progress.done()
    return Checked(pte_path, diff, pred, metrics, measured)


def verify_program(src: ModelSource, res: ExportResult, program: Any, max_batch: int) -> float:
    """Run 256 raw rows (or max_batch) through the loaded program and compare with the
    eager model; the largest absolute difference, or BundleError past the tolerance."""
    rng = np.random.default_rng(1)
    n = min(256, max_batch)
    rows = src.X_test[rng.choice(len(src.X_test), size=n, replace=len(src.X_test) < n)]
    got = run_rows(program, rows, max_batch)
    with torch.no_grad():
        want = res.reference(torch.as_tensor(rows)).numpy()
    diff = float(np.max(np.abs(got - want)))
    if res.quantization == "fp32":
        tol = 1e-4 * (1 + float(np.max(np.abs(want))))
    else:
        # XNNPACK's int8 kernels round requantization differently from the eager
        # simulation: allow two 8-bit steps of the output range, no more
        step = float(np.max(want) - np.min(want)) / 255.0
        tol = 2.0 * step + 1e-5
        if src.task == "classification":
            # rounding differences compound per int8 layer: a 4-layer int8 CNN (digits_cnn)
            # differs by up to 0.03 in probability from the eager simulation
            tol = max(tol, 0.05)
    if not np.isfinite(got).all() or diff > tol:
        raise BundleError(
            f"the exported program disagrees with the eager {res.quantization} model "
            f"(max difference {diff:.3g} > {tol:.3g}); not shipping it"
        )
    return diff


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
        latency_budget_ms=plan.latency_budget_ms, metric=metric, value=shipped_metrics.get(metric))
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
    n_out = int(exported.reference(torch.as_tensor(src.X_test[:2])).shape[1])
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
            max_batch=proj.export.max_batch,
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
                            verify_max_abs_diff=checked.verify_max_abs_diff, **build),
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
