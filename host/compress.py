"""Compression that fits the target: try variants, measure each, ship the smallest good one.

    from toma_edge.host.compress import compress
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
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..budget import format_size, parse_size
from ..device.adapter import load_program
from ..errors import BudgetError, BundleError, ConfigError
from ..profiles import TargetProfile, load_profile
from ..project import CompressConfig
from .export import (
    ExportResult,
    Quantization,
    calibration_batches,
    export_net,
    export_program,
    run_rows,
)
from .prune import Criterion, find_prunable, finetune, prune_structured
from .train import Task, TrainSpec, evaluate

__all__ = [
    "AUTO_PRUNE",
    "ALL_QUANTIZATIONS",
    "Candidate",
    "CompressResult",
    "ProgressFn",
    "compress",
    "candidate_variants",
    "choose",
    "validation_split",
    "default_tolerance",
    "BuildChoice",
    "search_for_build",
    "load_saved_model",
    "compress_saved",
]

#: the ratios ``prune: auto`` tries
AUTO_PRUNE: tuple[float, ...] = (0.0, 0.25, 0.5)
#: the kinds ``quantize: auto`` tries
ALL_QUANTIZATIONS: tuple[Quantization, ...] = ("fp32", "int8", "int8-dynamic")
#: called with a line of text as each candidate is measured
ProgressFn = Callable[[str], None]


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

    def as_dict(self) -> dict[str, Any]:
        """The manifest's ``candidates`` entry."""
        d = asdict(self)
        d.pop("over")
        d.pop("metric")
        d.pop("value")
        d[self.metric] = None if math.isnan(self.value) else self.value
        d["measured_peak_bytes"] = d.pop("peak_bytes")
        if not self.miss:
            d.pop("miss")
        return d


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


def candidate_variants(config: CompressConfig, *, prunable: bool = True
                       ) -> list[tuple[Quantization, float]]:
    """(quantization, prune ratio) pairs the config allows, smallest search first."""
    q = config.quantize
    kinds: tuple[Quantization, ...]
    if q == "auto":
        kinds = ALL_QUANTIZATIONS
    elif q in ("none", "fp32"):
        kinds = ("fp32",)
    else:
        kinds = (q,)  # type: ignore[assignment]
    if config.prune == "auto":
        ratios = AUTO_PRUNE if prunable else (0.0,)
    else:
        ratios = (float(config.prune),)
    return [(k, r) for r in ratios for k in kinds]


def validation_split(n: int, *, task: Task | str, y: np.ndarray | None = None, fraction: float = 0.2,
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


def latency_ms(program: Any, x: np.ndarray, *, repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of one forward of ``x`` through a loaded program, milliseconds."""
    x = np.ascontiguousarray(x)
    for _ in range(warmup):
        program.run([x])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        program.run([x])
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def start_peak_measurement(pte_path: Path, batches: Iterable[int] = (1,)) -> subprocess.Popen[str]:
    """Start measuring the peak RSS increase over the loaded program, per batch size, in a
    fresh device process; ``finish_peak_measurement`` collects it. Runs beside the next export."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "toma_edge.device.measure", str(pte_path),
           "--batches", ",".join(str(b) for b in batches)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_peak_measurement(proc: subprocess.Popen[str], *, timeout_s: float = 300) -> dict[str, Any]:
    """The JSON the device's measure module printed (adapter, measured_peak_bytes)."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.communicate()
        raise BundleError(f"measuring the program's memory took over {timeout_s:g} s") from e
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"the exported program does not run in the device runtime: {last}")
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


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
        why.append(f"needs {format_size(pte + peak)} at batch 1, {format_size(pte + peak - working)} over "
                   f"the {format_size(working)} the inference budget leaves after the baseline")
    if latency_budget_ms is not None and lat > latency_budget_ms:
        overs.append(lat / latency_budget_ms - 1)
        why.append(f"takes {lat:.3f} ms at batch 1, {lat - latency_budget_ms:.3f} ms over the "
                   f"{latency_budget_ms:g} ms latency budget")
    return (max(overs) if overs else 0.0), "; ".join(why)


def choose(candidates: Iterable[Candidate], *, tolerance: float, target: str = "the target") -> Candidate:
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
            f"no compression variant fits {target}: the closest, {closest.label}, misses: {closest.miss}; "
            "allow more compression (compress.quantize: auto, compress.prune: auto) or relax the budget"
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
    progress: ProgressFn | None = None,
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
    storage_bytes = parse_size(storage_budget) if storage_budget is not None else profile.storage_budget_bytes
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
    pending: list[tuple[Quantization, float, ExportResult, float, float, subprocess.Popen[str]]] = []
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
                score = evaluate(functools.partial(run_rows, prog, max_batch=max_batch), X_val, y_val,
                                 task, prefix="val_")[f"val_{metric}"]
                del prog
                # the memory of this one is measured while the next one exports
                pending.append((kind, ratio, res, lat, float(score), start_peak_measurement(pte_path, (1,))))
                if progress is not None:
                    progress(f"{kind} pruned {ratio:.0%}: {format_size(len(res.pte))}, {lat:.3f} ms, "
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
    progress: ProgressFn | None = None,
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
                       val=(X_train[val_idx], y_train[val_idx]), target=profile, max_batch=max_batch,
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


def load_saved_model(path: str | Path, factory: Callable[[], nn.Module]) -> nn.Module:
    """A model saved with ``torch.save``: the module itself, or a state_dict for ``factory()``."""
    from ..errors import InputError

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
            raise ConfigError(
                f"{p}: the state_dict does not fit the project's model "
                f"({first[1].strip() if len(first) > 1 else first[0] if first else type(e).__name__}); "
                "pass --project with the factory that built it, or save the whole module"
            ) from e
        return model.eval()
    raise InputError(f"{p}: holds a {type(obj).__name__}, not a torch.nn.Module or a state_dict")


def compress_saved(
    model_path: str | Path,
    *,
    target: str = "rpi",
    project: str | Path | None = None,
    out: str | Path | None = None,
    storage_budget: str | int | None = None,
    latency_budget_ms: float | None = None,
    progress: ProgressFn | None = None,
) -> Any:
    """``toma-edge compress``: the search and export alone over a saved, trained model;
    writes a bundle like build's (``dist/<target>/`` by default) and returns a BuildResult.

    The project (or the built-in example) gives the data: the search fine-tunes on the
    training rows less a validation split and scores on that split; the test split is
    only reported. ``metrics.reference`` is the saved model on the test split.
    """
    import shutil

    from .build import (
        BuildResult,
        _replace_dir,
        _verify,
        _write_manifest,
        bundle_manifest,
        measure_peaks,
        summary_lines,
    )
    from .plots import write_plots
    from .source import load_source, with_target_defaults
    from .train import predict_numpy

    t0 = time.perf_counter()
    profile = load_profile(target)
    out_dir = Path(out) if out is not None else Path("dist") / profile.name
    storage_bytes = parse_size(storage_budget) if storage_budget is not None else profile.storage_budget_bytes
    src = load_source(project)
    src.project = with_target_defaults(src.project, profile)
    proj = src.project
    task: Task = proj.task
    max_batch = proj.export.max_batch
    model = load_saved_model(model_path, src.factory)
    ref_net = export_net(model, task)
    ref_metrics = evaluate(lambda x: predict_numpy(ref_net, x), src.X_test, src.y_test, task, prefix="test_")
    spec = TrainSpec(task=task, epochs=proj.train.epochs, lr=proj.train.lr,
                     batch_size=proj.train.batch_size, seed=proj.train.seed,
                     weight_decay=proj.train.weight_decay)
    fit_idx, val_idx = validation_split(len(src.X_train), task=task, y=src.y_train, seed=spec.seed)
    res = compress(model, proj.compress, task=task,
                   train=(src.X_train[fit_idx], src.y_train[fit_idx]),
                   val=(src.X_train[val_idx], src.y_train[val_idx]), target=profile,
                   max_batch=max_batch, storage_budget=storage_bytes,
                   latency_budget_ms=latency_budget_ms, spec=spec, progress=progress)
    if progress is not None:
        progress("compression candidates (* shipped):\n" + res.table())
    kind = res.shipped.quantization
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pte_path = tmp / "model.pte"
        pte_path.write_bytes(res.export.pte)
        program = load_program(pte_path, threads=1)  # loaded once: verify, metrics, plot
        verify_diff = _verify(src, res.export, program, max_batch)
        pred = run_rows(program, src.X_test, max_batch)
        del program
        shipped_metrics = evaluate(lambda x: pred, src.X_test, src.y_test, task, prefix="test_")
        meas = measure_peaks(pte_path, max_batch)
        manifest = bundle_manifest(
            src, profile, res.export, res.model, storage_bytes=storage_bytes, quantization=kind,
            prune=res.shipped.prune,
            candidates=[dict(c.as_dict(), shipped=c is res.shipped) for c in res.candidates],
            ref_metrics=ref_metrics, shipped_metrics=shipped_metrics, measured=meas,
            build_info={"command": "compress", "source_model": str(model_path),
                        "verify_max_abs_diff": verify_diff,
                        "data": {"train_rows": int(len(fit_idx)), "validation_rows": int(len(val_idx)),
                                 "test_rows": int(len(src.X_test)), "builtin_example": src.builtin}})
        write_plots(tmp, task=task, y_true=src.y_test, y_pred=pred, candidates=res.candidates,
                    shipped=res.shipped, classes=src.classes)
        _write_manifest(tmp, manifest)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    secs = time.perf_counter() - t0
    return BuildResult(out=out_dir, manifest=manifest, seconds=secs,
                       summary=summary_lines(manifest, profile, secs))
