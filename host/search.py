"""Compression search: try the variants a config allows, measure each, choose the smallest
good one that fits the target.

    from toma_edge.host import compress
    from toma_edge.project import CompressConfig
    res = compress(model, CompressConfig(quantize="auto", prune="auto"), task="regression",
                   train=(X_fit, y_fit), val=(X_val, y_val), target="rpi")
    print(res.table()); res.shipped.quantization, res.shipped.prune
    open("model.pte", "wb").write(res.export.pte)

Candidates are the quantization kinds ``config.quantize`` allows (``auto``: fp32, int8 and
int8-dynamic) times the pruning ratios ``config.prune`` allows (``auto``: 0, 0.25, 0.5 of
the hidden units, structured, each pruned copy fine-tuned on ``train``). Each is exported
and measured for real: .pte bytes, the planned arena at ``max_batch``, the peak RSS
increase of a fresh device process at batch 1, the batch-1 latency through the ExecuTorch
runtime on this host (one thread, median), and the metric (R2 or accuracy) on ``val``
through the runtime. A candidate fits when its .pte is within the storage budget, the
.pte plus its batch-1 peak within the inference budget less the profile's expected
baseline, and its latency within ``latency_budget_ms`` (when given). Among those that fit,
the smallest .pte whose validation metric is within ``tolerance`` of the best ships
(default 0.005 R2, or 0.005 accuracy = half a point). ``val`` must be rows the model was
not trained on; the test split is never shown to the search. None fits: BudgetError
naming the closest candidate and by how much it misses.
"""

from __future__ import annotations

import math
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..budget import format_size, parse_size
from ..bundle import CandidateEntry
from ..device.adapter import load_program
from ..errors import BudgetError, BundleError, ConfigError
from ..profiles import TargetProfile, load_profile
from ..progress import Progress
from ..project import CompressConfig
from .export import (
    ExportResult,
    Quantization,
    calibration_batches,
    export_net,
    export_program,
)
from .measure import finish_peak_measurement, latency_ms, start_peak_measurement
from .prune import Criterion, find_prunable, finetune, prune_structured, pruning_plan
from .train import Task, TrainSpec, evaluate
from .verify import Tolerance, verify_export

__all__ = [
    "AUTO_PRUNE",
    "ALL_QUANTIZATIONS",
    "Candidate",
    "CompressResult",
    "compress",
    "allowed_quantizations",
    "preferred_quantization",
    "candidate_variants",
    "choose",
    "format_table",
    "validation_split",
    "default_tolerance",
    "finetune_epochs_for",
    "tolerance_of",
    "BuildChoice",
    "search_for_build",
]

#: the ratios ``prune: auto`` tries
AUTO_PRUNE: tuple[float, ...] = (0.0, 0.25, 0.5)
#: the kinds ``quantize: auto`` tries
ALL_QUANTIZATIONS: tuple[Quantization, ...] = ("fp32", "int8", "int8-dynamic")


@dataclass(frozen=True)
class Candidate:
    """One compression variant, measured. Sizes in bytes, latency in milliseconds."""

    quantization: Quantization
    prune: float
    pte_bytes: int
    planned_bytes: int
    peak_bytes: int
    latency_ms: float
    metric: str
    value: float
    fits: bool
    miss: str = ""
    #: how far over its worst limit, as a fraction (0 when it fits)
    over: float = 0.0
    #: why the candidate was dropped (it failed to export or run, or disagreed with its
    #: eager model); "" for a candidate that was measured
    dropped: str = ""
    #: the batch the program is fixed at (None: dynamic 1..max_batch)
    fixed_batch: int | None = None

    @property
    def label(self) -> str:
        return f"{self.quantization} pruned {self.prune:.0%}"

    @classmethod
    def failed(cls, quantization: Quantization, prune: float, metric: str, why: str
               ) -> Candidate:
        """A candidate dropped for ``why``: nothing measured, never chosen."""
        return cls(quantization, prune, 0, 0, 0, float("nan"), metric, float("nan"), False,
                   dropped=why)

    def entry(self, *, shipped: bool) -> CandidateEntry:
        """The manifest's ``candidates`` entry (a metric that was not scored is null)."""
        extra: dict[str, object] = {} if not self.miss else {"miss": self.miss}
        if self.dropped:
            extra["dropped"] = self.dropped
        if self.fixed_batch:
            extra["export_batch"] = self.fixed_batch
        return CandidateEntry(
            quantization=self.quantization, prune=self.prune, pte_bytes=self.pte_bytes,
            planned_bytes=self.planned_bytes, fits=self.fits,
            latency_ms=None if math.isnan(self.latency_ms) else self.latency_ms,
            measured_peak_bytes=self.peak_bytes, shipped=shipped, **extra,
            **{self.metric: None if math.isnan(self.value) else self.value},
        )


@dataclass
class CompressResult:
    """The shipped variant, every candidate, the shipped eager model and its program."""

    shipped: Candidate
    candidates: tuple[Candidate, ...]
    model: nn.Module
    export: ExportResult
    tolerance: float

    def table(self) -> str:
        return format_table(self.candidates, self.shipped)


def default_tolerance(task: Task | str) -> float:
    """0.005 R2 for regression, 0.005 accuracy (half a point) for classification."""
    return 0.005


def allowed_quantizations(quantize: str | Sequence[str]) -> tuple[Quantization, ...]:
    """The kinds ``compress.quantize`` allows: ``auto`` all of :data:`ALL_QUANTIZATIONS`,
    ``none`` (or ``fp32``) fp32 alone, a kind itself alone, a list those kinds (in the
    order of :data:`ALL_QUANTIZATIONS`). The one meaning of ``auto``."""
    if not isinstance(quantize, str):
        return tuple(k for k in ALL_QUANTIZATIONS if k in quantize)
    if quantize == "auto":
        return ALL_QUANTIZATIONS
    if quantize in ("none", "fp32"):
        return ("fp32",)
    return (quantize,)  # type: ignore[return-value]


def preferred_quantization(quantize: str | Sequence[str], profile: TargetProfile
                           ) -> Quantization:
    """Of the allowed kinds, the target's preferred one (its ``export.quantization``;
    ``auto`` there means int8), else the first allowed: what build's cross-validation
    scores before the search has chosen."""
    kinds = allowed_quantizations(quantize)
    pref = profile.export.quantization
    want = "int8" if pref == "auto" else pref
    return want if want in kinds else kinds[0]  # type: ignore[return-value]


def candidate_variants(config: CompressConfig, *, prunable: bool = True
                       ) -> list[tuple[Quantization, float]]:
    """(quantization, prune ratio) pairs the config allows, smallest search first."""
    kinds = allowed_quantizations(config.quantize)
    if config.prune == "auto":
        ratios = AUTO_PRUNE if prunable else (0.0,)
    else:
        ratios = (float(config.prune),)
    return [(k, r) for r in ratios for k in kinds]


def tolerance_of(config: CompressConfig) -> Tolerance:
    """The verification bounds ``compress.verify`` sets."""
    v = config.verify
    return Tolerance(v.min_agreement, v.max_error, v.min_fp32_agreement, v.max_fp32_error)


def finetune_epochs_for(config: CompressConfig, spec: TrainSpec) -> int:
    """Fine-tuning epochs after pruning: ``compress.finetune_epochs``, else a fifth of
    ``train.epochs`` (at least 5)."""
    return config.finetune_epochs or max(5, spec.epochs // 5)


def validation_split(n: int, *, task: Task | str, y: np.ndarray | None = None,
                     fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) row indices of the training data; stratified for classification."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    strat = None
    if task == "classification" and y is not None:
        labels = np.asarray(y).reshape(-1)
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2 and int(round(n * fraction)) >= len(counts):
            strat = labels
    fit, val = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    return np.sort(fit), np.sort(val)


def _limits_miss(pte: int, peak: int, lat: float, *, profile: TargetProfile, adapter: str,
                 storage_bytes: int, latency_budget_ms: float | None) -> tuple[float, str]:
    """(fraction over the worst limit, a phrase naming every limit missed)."""
    working = profile.working_budget_bytes(adapter)
    overs: list[float] = []
    why: list[str] = []
    if pte > storage_bytes:
        overs.append(pte / storage_bytes - 1)
        why.append(f"model.pte {format_size(pte)} is {format_size(pte - storage_bytes)} over the "
                   f"{format_size(storage_bytes)} storage budget")
    if pte + peak > working:
        overs.append((pte + peak) / max(1, working) - 1)
        why.append(f"needs {format_size(pte + peak)} at batch 1, "
                   f"{format_size(pte + peak - working)} over "
                   f"the {format_size(working)} the inference budget leaves after the baseline")
    if latency_budget_ms is not None and lat > latency_budget_ms:
        overs.append(lat / latency_budget_ms - 1)
        why.append(f"takes {lat:.3f} ms at batch 1, {lat - latency_budget_ms:.3f} ms over the "
                   f"{latency_budget_ms:g} ms latency budget")
    return (max(overs) if overs else 0.0), "; ".join(why)


def choose(candidates: Iterable[Candidate], *, tolerance: float,
           target: str = "the target") -> Candidate:
    """The smallest fitting candidate within ``tolerance`` of the best fitting metric.

    Metrics are higher-is-better (R2, accuracy); ties in size go to the better metric.
    Raises BudgetError naming the closest candidate when none fits.
    """
    every = list(candidates)
    if not every:
        raise ConfigError("no compression candidates to choose from")
    cands = [c for c in every if not c.dropped]
    if not cands:
        first = every[0]
        more = f" (and {len(every) - 1} more candidates failed)" if len(every) > 1 else ""
        raise BundleError(f"no compression candidate works: {first.label} {first.dropped}{more}")
    fitting = [c for c in cands if c.fits]
    if not fitting:
        closest = min(cands, key=lambda c: (c.over, c.pte_bytes))
        raise BudgetError(
            f"no compression variant fits {target}: the closest, {closest.label}, "
            f"misses: {closest.miss}; allow more compression (compress.quantize: auto, "
            "compress.prune: auto) or relax the budget"
        )
    scored = [c for c in fitting if not math.isnan(c.value)]
    if not scored:  # nothing was scored (a single variant without cross-validation)
        return min(fitting, key=lambda c: c.pte_bytes)
    best = max(c.value for c in scored)
    good = [c for c in scored if c.value >= best - tolerance - 1e-12]
    return min(good, key=lambda c: (c.pte_bytes, -c.value))


def format_table(candidates: Iterable[Candidate], shipped: Candidate | None = None) -> str:
    """The candidates as a text table; ``*`` marks the shipped one."""
    cands = list(candidates)
    metric = cands[0].metric if cands else "val"
    head = (f"  {'quantization':13s}{'prune':>6s}{'pte':>10s}{'planned':>10s}{'peak@1':>10s}"
            f"{'ms@1':>9s}{metric:>14s}  fits")
    lines = [head]
    for c in cands:
        mark = "*" if c is shipped else " "
        if c.dropped:
            lines.append(f"{mark} {c.quantization:13s}{c.prune:6.2f}  dropped: {c.dropped}")
            continue
        lines.append(
            f"{mark} {c.quantization:13s}{c.prune:6.2f}{format_size(c.pte_bytes):>10s}"
            f"{format_size(c.planned_bytes):>10s}{format_size(c.peak_bytes):>10s}{c.latency_ms:9.3f}"
            f"{c.value:14.4f}  {'yes' if c.fits else 'no: ' + c.miss}"
        )
    return "\n".join(lines)


def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    *,
    task: Task,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    target: str | TargetProfile = "rpi",
    max_batch: int = 256,
    storage_budget: str | int | None = None,
    latency_budget_ms: float | None = None,
    spec: TrainSpec | None = None,
    finetune_epochs: int | None = None,
    criterion: Criterion = "l2",
    progress: Progress | None = None,
    finetune_fn: Callable[[nn.Module], nn.Module] | None = None,
) -> CompressResult:
    """Search the variants ``config`` allows for ``model`` (trained, fp32, raw logits for
    classification) and return the one to ship; see the module docstring.

    ``train`` rows fine-tune the pruned copies and calibrate int8; ``val`` rows score them.
    ``spec`` sets the fine-tuning's learning rate and batch (default: Adam 1e-3, batch 32);
    ``finetune_epochs`` defaults to ``config.finetune_epochs``, else a fifth of
    ``spec.epochs`` (at least 5). A candidate that fails to prune, export, load or run, or
    disagrees with its eager model (``config.verify``) is dropped with its reason and the
    search goes on; when every one fails, BundleError names the first and its reason.
    ``storage_budget`` defaults to the target's. ``finetune_fn``: fine-tunes a pruned copy
    in the caller's own loop instead (``train`` labels are then unused).
    """

    config = config or CompressConfig()
    profile = target if isinstance(target, TargetProfile) else load_profile(target)
    storage_bytes = (parse_size(storage_budget) if storage_budget is not None
                     else profile.storage_budget_bytes)
    spec = spec or TrainSpec(task=task)
    epochs = finetune_epochs if finetune_epochs is not None else finetune_epochs_for(config, spec)
    tol = config.tolerance if config.tolerance is not None else default_tolerance(task)
    X_tr, y_tr = (np.asarray(a) for a in train)
    X_val, y_val = (np.asarray(a) for a in val)
    X_tr = X_tr.astype(np.float32)
    X_val = X_val.astype(np.float32)
    metric = "r2" if task == "regression" else "accuracy"
    # >= 16 example rows: with 2, export guards conv models' batch to <= 15 (numel < 1024)
    example = torch.as_tensor(X_tr[: max(2, min(32, max_batch))])
    plan = pruning_plan(model, example[:2]) if config.prune != 0.0 else None
    if plan is not None and progress is not None and (plan.left_alone or not plan):
        progress.info(plan.describe())
    prunable = config.prune != "auto" or bool(plan)
    variants = candidate_variants(config, prunable=prunable)
    cal = calibration_batches(X_tr, config.calibration_batches)
    verify_tol = tolerance_of(config)
    pruned: dict[float, nn.Module | str] = {}
    cands: list[Candidate] = []
    programs: dict[tuple[str, float], ExportResult] = {}
    Pending = tuple[Quantization, float, ExportResult, float, float, subprocess.Popen[str]]
    pending: list[Pending] = []
    say = progress.info if progress is not None else (lambda _msg: None)
    with tempfile.TemporaryDirectory(prefix="toma-compress-") as td:
        try:
            for kind, ratio in variants:
                label = f"{kind} pruned {ratio:.0%}"
                if ratio not in pruned:
                    pruned[ratio] = _pruned_copy(model, ratio, criterion, X_tr, y_tr, spec,
                                                 epochs, finetune_fn, example[:2])
                base = pruned[ratio]
                if isinstance(base, str):  # pruning to this ratio failed: every kind of it
                    cands.append(Candidate.failed(kind, ratio, f"val_{metric}", base))
                    say(f"{label}: dropped: {base}")
                    continue
                say(f"{label}: exporting")
                tried = _try_candidate(base, kind, task=task, example=example,
                                       max_batch=max_batch, cal=cal, X_val=X_val, y_val=y_val,
                                       tol=verify_tol, pte_path=Path(td) / f"{kind}-{ratio}.pte")
                if isinstance(tried, str):
                    cands.append(Candidate.failed(kind, ratio, f"val_{metric}", tried))
                    say(f"{label}: dropped: {tried}")
                    continue
                res, lat, score = tried
                # the memory of this one is measured while the next one exports
                proc = start_peak_measurement(Path(td) / f"{kind}-{ratio}.pte",
                                              (res.fixed_batch or 1,))
                pending.append((kind, ratio, res, lat, float(score), proc))
                say(f"{label}: {format_size(len(res.pte))}, {lat:.3f} ms, "
                    f"val {metric} {score:.4f}"
                    + (f", fixed batch {res.fixed_batch}" if res.fixed_batch else ""))
            for kind, ratio, res, lat, score, proc in pending:
                try:
                    meas = finish_peak_measurement(proc)
                except BundleError as e:
                    cands.append(Candidate.failed(kind, ratio, f"val_{metric}", str(e)))
                    continue
                peak = int(meas["measured_peak_bytes"][str(res.fixed_batch or 1)])
                over, miss = _limits_miss(len(res.pte), peak, lat, profile=profile,
                                          adapter=meas["adapter"], storage_bytes=storage_bytes,
                                          latency_budget_ms=latency_budget_ms)
                cands.append(Candidate(kind, ratio, len(res.pte), res.planned_bytes, peak, lat,
                                       f"val_{metric}", score, not miss, miss, over,
                                       fixed_batch=res.fixed_batch))
                programs[(kind, ratio)] = res
        finally:
            for *_, proc in pending:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    order = {v: i for i, v in enumerate(variants)}
    cands.sort(key=lambda c: order[(c.quantization, c.prune)])
    shipped = choose(cands, tolerance=tol, target=profile.name)
    model_out = pruned[shipped.prune]
    assert isinstance(model_out, nn.Module)
    return CompressResult(shipped=shipped, candidates=tuple(cands), model=model_out,
                          export=programs[(shipped.quantization, shipped.prune)], tolerance=tol)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _pruned_copy(model: nn.Module, ratio: float, criterion: Criterion, X: np.ndarray,
                 y: np.ndarray, spec: TrainSpec, epochs: int,
                 finetune_fn: Callable[[nn.Module], nn.Module] | None,
                 example: torch.Tensor) -> nn.Module | str:
    """``model`` pruned to ``ratio`` and fine-tuned, or why that failed."""
    try:
        m = prune_structured(model, ratio, criterion=criterion, example_inputs=example)
        if ratio == 0:
            return m
        if finetune_fn is not None:
            return finetune_fn(m).eval()
        return finetune(m, X, y, spec, epochs=epochs)
    except Exception as e:  # noqa: BLE001  (a user's model: any failure drops this ratio)
        return f"pruning failed: {_first_line(e)}"


def _try_candidate(model: nn.Module, kind: Quantization, *, task: Task, example: torch.Tensor,
                   max_batch: int, cal: list[np.ndarray], X_val: np.ndarray,
                   y_val: np.ndarray, tol: Tolerance, pte_path: Path
                   ) -> tuple[ExportResult, float, float] | str:
    """Export one candidate, check it against its eager model at several batch sizes, time
    it and score it on ``X_val``: (program, latency ms, score), or why it was dropped."""
    metric = "r2" if task == "regression" else "accuracy"
    try:
        res = export_program(export_net(model, task), example, max_batch=max_batch,
                             quantize=kind, calibration=cal)
    except Exception as e:  # noqa: BLE001  (export and lowering raise many kinds)
        return f"does not export: {_first_line(e)}"
    pte_path.write_bytes(res.pte)
    try:
        prog = load_program(pte_path, threads=1)
    except Exception as e:  # noqa: BLE001
        return f"does not load in the runtime: {_first_line(e)}"
    try:
        agree = verify_export(prog, res, X_val, task=task, max_batch=max_batch, y=y_val,
                              tolerance=tol)
        if not agree.ok:
            return agree.reason
        b = res.fixed_batch or 1
        lat = latency_ms(prog, np.repeat(X_val[:1], b, axis=0))
        outputs = agree.outputs  # every validation row ran once, checked: score those
        assert outputs is not None
        score = evaluate(lambda _x: outputs, X_val, y_val, task, prefix="val_")[f"val_{metric}"]
    finally:
        prog.close()
    return res, lat, float(score)


@dataclass(frozen=True)
class BuildChoice:
    """What build ships: the variant, the reference model pruned (and fine-tuned) to it,
    and the measured candidates (``shipped`` is None until a single variant is measured)."""

    quantization: Quantization
    prune: float
    model: nn.Module
    candidates: tuple[Candidate, ...] = ()
    shipped: Candidate | None = None
    search: CompressResult | None = None

    def table(self) -> str:
        return format_table(self.candidates, self.shipped)

    def measure_single(
        self, pte_path: Path, *, planned_bytes: int, peak_bytes: int, adapter: str,
        profile: TargetProfile, storage_bytes: int, latency_budget_ms: float | None,
        metric: str, value: float | None, fixed_batch: int | None = None,
    ) -> BuildChoice:
        """The one allowed variant, measured on the program build exported: its latency
        here, its fit; ``value`` is its cross-validation metric (held-out folds of the
        training rows) or None. Raises BudgetError when it does not fit."""

        prog = load_program(pte_path, threads=1)
        rows = prog.inputs[0].shape[1:]
        lat = latency_ms(prog, np.zeros((fixed_batch or 1, *rows), dtype=np.float32))
        prog.close()
        pte = pte_path.stat().st_size
        over, miss = _limits_miss(pte, peak_bytes, lat, profile=profile, adapter=adapter,
                                  storage_bytes=storage_bytes, latency_budget_ms=latency_budget_ms)
        c = Candidate(self.quantization, self.prune, pte, planned_bytes, peak_bytes, lat, metric,
                      float("nan") if value is None else float(value), not miss, miss, over,
                      fixed_batch=fixed_batch)
        choose([c], tolerance=0.0, target=profile.name)
        return BuildChoice(self.quantization, self.prune, self.model, (c,), c, None)


def search_for_build(
    factory: Callable[[], nn.Module],
    reference: nn.Module,
    config: CompressConfig,
    *,
    task: Task,
    X_train: np.ndarray,
    y_train: np.ndarray,
    spec: TrainSpec,
    profile: TargetProfile,
    storage_bytes: int,
    latency_budget_ms: float | None,
    max_batch: int,
    val_fraction: float = 0.2,
    progress: Progress | None = None,
) -> BuildChoice:
    """Build's search: train a search model on the training rows less a validation split,
    search on it (``compress``), then apply the chosen variant to ``reference`` (trained on
    all training rows), fine-tuning it on all of them when pruned.

    With a single allowed variant there is nothing to choose: no search model is trained,
    and build measures that variant on the program it exports (``measure_single``).
    The reference model and its test metrics are untouched; the test split is never used.
    """
    from .train import train_model

    example = torch.as_tensor(np.asarray(X_train[:2], dtype=np.float32))
    prunable = config.prune != "auto" or bool(find_prunable(reference, example))
    variants = candidate_variants(config, prunable=prunable)
    res: CompressResult | None = None
    if len(variants) == 1:
        kind, ratio = variants[0]
    else:
        fit_idx, val_idx = validation_split(len(X_train), task=task, y=y_train,
                                            fraction=val_fraction, seed=spec.seed)
        torch.manual_seed(spec.seed)
        search_model = train_model(factory(), X_train[fit_idx], y_train[fit_idx], spec)
        res = compress(search_model, config, task=task, train=(X_train[fit_idx], y_train[fit_idx]),
                       val=(X_train[val_idx], y_train[val_idx]), target=profile,
                       max_batch=max_batch,
                       storage_budget=storage_bytes, latency_budget_ms=latency_budget_ms, spec=spec,
                       progress=progress)
        kind, ratio = res.shipped.quantization, res.shipped.prune
    model = reference
    if ratio > 0:
        model = finetune(prune_structured(reference, ratio, example_inputs=example),
                         X_train, y_train, spec,
                         epochs=finetune_epochs_for(config, spec))
    if res is None:
        return BuildChoice(kind, ratio, model)
    return BuildChoice(kind, ratio, model, res.candidates, res.shipped, res)
