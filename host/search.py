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

import functools
import math
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..budget import format_size, parse_size
from ..bundle import CandidateEntry
from ..device.adapter import load_program
from ..errors import BudgetError, ConfigError
from ..profiles import TargetProfile, load_profile
from ..progress import Progress
from ..project import CompressConfig
from .export import (
    ExportResult,
    Quantization,
    calibration_batches,
    export_net,
    export_program,
    run_rows,
)
from .measure import finish_peak_measurement, latency_ms, start_peak_measurement
from .prune import Criterion, find_prunable, finetune, prune_structured
from .train import Task, TrainSpec, evaluate

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

    @property
    def label(self) -> str:
        return f"{self.quantization} pruned {self.prune:.0%}"

    def entry(self, *, shipped: bool) -> CandidateEntry:
        """The manifest's ``candidates`` entry (a metric that was not scored is null)."""
        extra = {} if not self.miss else {"miss": self.miss}
        return CandidateEntry(
            quantization=self.quantization, prune=self.prune, pte_bytes=self.pte_bytes,
            planned_bytes=self.planned_bytes, latency_ms=self.latency_ms, fits=self.fits,
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


def allowed_quantizations(quantize: str) -> tuple[Quantization, ...]:
    """The kinds ``compress.quantize`` allows: ``auto`` all of :data:`ALL_QUANTIZATIONS`,
    ``none`` (or ``fp32``) fp32 alone, a kind itself alone. The one meaning of ``auto``."""
    if quantize == "auto":
        return ALL_QUANTIZATIONS
    if quantize in ("none", "fp32"):
        return ("fp32",)
    return (quantize,)  # type: ignore[return-value]


def preferred_quantization(quantize: str, profile: TargetProfile) -> Quantization:
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
    cands = list(candidates)
    if not cands:
        raise ConfigError("no compression candidates to choose from")
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
) -> CompressResult:
    """Search the variants ``config`` allows for ``model`` (trained, fp32, raw logits for
    classification) and return the one to ship; see the module docstring.

    ``train`` rows fine-tune the pruned copies and calibrate int8; ``val`` rows score them.
    ``spec`` sets the fine-tuning's learning rate and batch (default: Adam 1e-3, batch 32);
    ``finetune_epochs`` defaults to a fifth of ``spec.epochs`` (at least 5).
    ``storage_budget`` defaults to the target's.
    """

    config = config or CompressConfig()
    profile = target if isinstance(target, TargetProfile) else load_profile(target)
    storage_bytes = (parse_size(storage_budget) if storage_budget is not None
                     else profile.storage_budget_bytes)
    spec = spec or TrainSpec(task=task)
    epochs = finetune_epochs if finetune_epochs is not None else max(5, spec.epochs // 5)
    tol = config.tolerance if config.tolerance is not None else default_tolerance(task)
    X_tr, y_tr = (np.asarray(a) for a in train)
    X_val, y_val = (np.asarray(a) for a in val)
    X_tr = X_tr.astype(np.float32)
    X_val = X_val.astype(np.float32)
    metric = "r2" if task == "regression" else "accuracy"
    prunable = config.prune != "auto" or bool(find_prunable(model))
    variants = candidate_variants(config, prunable=prunable)
    cal = calibration_batches(X_tr, config.calibration_batches)
    # >= 16 example rows: with 2, export guards conv models' batch to <= 15 (numel < 1024)
    example = torch.as_tensor(X_tr[: max(2, min(32, max_batch))])
    pruned: dict[float, nn.Module] = {}
    cands: list[Candidate] = []
    programs: dict[tuple[str, float], ExportResult] = {}
    Pending = tuple[Quantization, float, ExportResult, float, float, subprocess.Popen[str]]
    pending: list[Pending] = []
    with tempfile.TemporaryDirectory(prefix="toma-compress-") as td:
        try:
            for kind, ratio in variants:
                if ratio not in pruned:
                    m = prune_structured(model, ratio, criterion=criterion)
                    if ratio > 0:
                        m = finetune(m, X_tr, y_tr, spec, epochs=epochs)
                    pruned[ratio] = m
                res = export_program(export_net(pruned[ratio], task), example, max_batch=max_batch,
                                     quantize=kind, calibration=cal)
                pte_path = Path(td) / f"{kind}-{ratio}.pte"
                pte_path.write_bytes(res.pte)
                prog = load_program(pte_path, threads=1)
                lat = latency_ms(prog, X_val[:1])
                score = evaluate(functools.partial(run_rows, prog, max_batch=max_batch),
                                 X_val, y_val,
                                 task, prefix="val_")[f"val_{metric}"]
                del prog
                # the memory of this one is measured while the next one exports
                proc = start_peak_measurement(pte_path, (1,))
                pending.append((kind, ratio, res, lat, float(score), proc))
                if progress is not None:
                    progress.info(f"{kind} pruned {ratio:.0%}: {format_size(len(res.pte))}, "
                                  f"{lat:.3f} ms, "
                             f"val {metric} {score:.4f}")
            for kind, ratio, res, lat, score, proc in pending:
                meas = finish_peak_measurement(proc)
                peak = int(meas["measured_peak_bytes"]["1"])
                over, miss = _limits_miss(len(res.pte), peak, lat, profile=profile,
                                          adapter=meas["adapter"], storage_bytes=storage_bytes,
                                          latency_budget_ms=latency_budget_ms)
                cands.append(Candidate(kind, ratio, len(res.pte), res.planned_bytes, peak, lat,
                                       f"val_{metric}", score, not miss, miss, over))
                programs[(kind, ratio)] = res
        finally:
            for *_, proc in pending:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    shipped = choose(cands, tolerance=tol, target=profile.name)
    return CompressResult(shipped=shipped, candidates=tuple(cands), model=pruned[shipped.prune],
                          export=programs[(shipped.quantization, shipped.prune)], tolerance=tol)


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
        metric: str, value: float | None,
    ) -> BuildChoice:
        """The one allowed variant, measured on the program build exported: its latency
        here, its fit; ``value`` is its cross-validation metric (held-out folds of the
        training rows) or None. Raises BudgetError when it does not fit."""

        prog = load_program(pte_path, threads=1)
        rows = prog.inputs[0].shape[1:]
        lat = latency_ms(prog, np.zeros((1, *rows), dtype=np.float32))
        pte = pte_path.stat().st_size
        over, miss = _limits_miss(pte, peak_bytes, lat, profile=profile, adapter=adapter,
                                  storage_bytes=storage_bytes, latency_budget_ms=latency_budget_ms)
        c = Candidate(self.quantization, self.prune, pte, planned_bytes, peak_bytes, lat, metric,
                      float("nan") if value is None else float(value), not miss, miss, over)
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

    prunable = config.prune != "auto" or bool(find_prunable(reference))
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
        model = finetune(prune_structured(reference, ratio), X_train, y_train, spec,
                         epochs=max(5, spec.epochs // 5))
    if res is None:
        return BuildChoice(kind, ratio, model)
    return BuildChoice(kind, ratio, model, res.candidates, res.shipped, res)
