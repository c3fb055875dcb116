"""``toma-edge build``: train, compress, export, verify and write a bundle.

    from toma_edge.host.build import build
    res = build(target="rpi", out="/tmp/b")         # the built-in example
    res.out, res.manifest["metrics"]["shipped"]["test_r2"]
    build(target="rpi4", project="toma-edge.yaml")  # a user's own model

The bundle is written into a temporary folder beside ``out`` and renamed into place
only when everything passed, so a failed build leaves nothing half-written.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..budget import format_size, parse_size
from ..bundle import make_archive, sign_manifest
from ..device.adapter import load_program
from ..errors import BudgetError, BundleError
from ..manifest import SCHEMA_VERSION, Manifest, sha256_file
from ..profiles import TargetProfile, load_profile
from .export import (
    ExportResult,
    Quantization,
    calibration_batches,
    export_net,
    export_program,
    run_rows,
)
from .source import ModelSource, load_source, with_target_defaults
from .train import MemoryPolicy, TrainSpec, evaluate, kfold_indices, predict_numpy, train_model

__all__ = ["BuildResult", "build", "Reporter"]


class Reporter:
    """Progress and messages of a build; the CLI passes a rich-backed one."""

    def phase(self, name: str, total: int | None = None) -> None:  # noqa: B027
        pass

    def advance(self, n: int = 1) -> None:  # noqa: B027
        pass

    def done(self) -> None:  # noqa: B027
        pass

    def info(self, msg: str) -> None:  # noqa: B027
        pass


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    seconds: float
    summary: list[str] = field(default_factory=list)
    archive: Path | None = None
    #: the eager model that model.pte computes (simulated int8 for int8 variants); not saved
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None


def _versions() -> dict[str, str]:
    v = {"toma_edge": __version__, "torch": torch.__version__.split("+")[0]}
    v["executorch"] = metadata.version("executorch")
    return v


def _predict_quantized(
    src: ModelSource, model: torch.nn.Module, X_cal: np.ndarray, kind: Quantization, max_batch: int,
    n_batches: int,
) -> Callable[[np.ndarray], np.ndarray]:
    from .export import quantize_model

    net = export_net(model, src.task)
    example = torch.as_tensor(X_cal[:2])
    q = quantize_model(net, example, kind=kind, max_batch=max_batch,
                       calibration=calibration_batches(X_cal, n_batches))

    def predict(X: np.ndarray) -> np.ndarray:
        outs = []
        with torch.no_grad():
            for i in range(0, len(X), max_batch):
                outs.append(q(torch.as_tensor(X[i : i + max_batch])).numpy())
        return np.concatenate(outs)

    return predict


def measure_peaks(pte_path: Path, max_batch: int) -> dict[str, Any]:
    """Peak RSS increase per batch size, measured in a fresh device process."""
    batches = sorted({1, *[b for b in (8, 32, 64, 128) if b < max_batch], max_batch})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "toma_edge.device.measure", str(pte_path),
           "--batches", ",".join(map(str, batches))]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"the exported program does not run in the device runtime: {last}")
    return json.loads(p.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _verify(src: ModelSource, res: ExportResult, program: Any, max_batch: int) -> float:
    """Run 256 raw rows (or max_batch) through the loaded program and compare with the
    eager model."""
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
    reporter: Reporter | None = None,
) -> BuildResult:
    """Build a bundle for ``target`` from the built-in example or a project file.

    ``memory_log``: write the build's RSS over time as JSONL there, and a PNG of it
    against the training budget beside it (same name, ``.png``).
    """
    kw = dict(target=target, project=project, out=out, storage_budget=storage_budget,
              train_budget=train_budget, latency_budget_ms=latency_budget_ms,
              sign_key=sign_key, archive=archive)
    if memory_log is None:
        return _build(reporter=reporter, **kw)  # type: ignore[arg-type]
    from ..probes import MemoryMonitor, plot_memory_log

    log_path = Path(memory_log)
    budget = _train_budget_bytes(load_profile(target), train_budget)
    with MemoryMonitor(interval_s=0.05, log_path=log_path, budget_bytes=budget) as mon:
        res = _build(reporter=_MarkingReporter(reporter or Reporter(), mon.mark), **kw)  # type: ignore[arg-type]
    png = plot_memory_log(log_path, log_path.with_suffix(".png"), budget,
                          title=f"toma-edge build --target {res.manifest['target']['name']}: RSS over time")
    res.summary.append(f"  memory log {log_path} (peak RSS {format_size(mon.peak_bytes)}"
                       + (f" against a {format_size(budget)} training budget" if budget else "")
                       + f"), plot {png}")
    return res


class _MarkingReporter(Reporter):
    """Passes progress on and names each phase in the memory log."""

    def __init__(self, inner: Reporter, mark: Callable[[str], None]) -> None:
        self.inner, self.mark = inner, mark

    def phase(self, name: str, total: int | None = None) -> None:
        self.mark(name)
        self.inner.phase(name, total)

    def advance(self, n: int = 1) -> None:
        self.inner.advance(n)

    def done(self) -> None:
        self.inner.done()

    def info(self, msg: str) -> None:
        self.inner.info(msg)


def _train_budget_bytes(profile: TargetProfile, train_budget: str | int | None) -> int | None:
    if train_budget is not None:
        return parse_size(train_budget, total_bytes=profile.ram_bytes)
    return profile.train_budget_bytes


def _build(
    *,
    target: str = "rpi",
    project: str | Path | None = None,
    out: str | Path | None = None,
    storage_budget: str | int | None = None,
    train_budget: str | int | None = None,
    latency_budget_ms: float | None = None,
    sign_key: str | Path | None = None,
    archive: bool = False,
    reporter: Reporter | None = None,
) -> BuildResult:
    t0 = time.perf_counter()
    rep = reporter or Reporter()
    profile: TargetProfile = load_profile(target)
    out_dir = Path(out) if out is not None else Path("dist") / profile.name
    storage_bytes = parse_size(storage_budget) if storage_budget is not None else profile.storage_budget_bytes
    src = load_source(project)
    src.project = with_target_defaults(src.project, profile)
    proj = src.project
    task = proj.task
    max_batch = proj.export.max_batch
    quant: Quantization = _resolve_quant(proj.compress.quantize, profile)
    spec = TrainSpec(task=task, epochs=proj.train.epochs, lr=proj.train.lr,
                     batch_size=proj.train.batch_size, seed=proj.train.seed,
                     weight_decay=proj.train.weight_decay)
    cal_batches = proj.compress.calibration_batches
    # every training run fits its steps into the training budget (micro-batches, checkpointing)
    memory = MemoryPolicy(train_budget_bytes=_train_budget_bytes(profile, train_budget),
                          micro_batch=proj.train.micro_batch, checkpointing=proj.train.checkpointing,
                          on_info=rep.info)

    # cross-validation on the training split only
    folds = proj.train.folds
    cv_ref: list[dict[str, float]] = []
    cv_q: list[dict[str, float]] = []
    total_epochs = spec.epochs * (folds + 1)
    rep.phase("training", total=total_epochs)
    # src.training: the arrays, or file-backed rows read through a budgeted loader (folds
    # are subsets of it, scored by streaming; quantized CV calibrates on a bounded sample)
    from .train import evaluate_data, loader_budget_bytes

    data = src.training
    if folds:
        labels = data.labels() if task == "classification" else None
        for tr_idx, va_idx in kfold_indices(data.rows, folds, seed=proj.train.seed, task=task, y=labels):
            torch.manual_seed(proj.train.seed)
            m = train_model(src.factory(), data.subset(tr_idx), None, spec,
                            progress=lambda *_: rep.advance(), memory=memory)
            net = export_net(m, src.task)
            val = data.subset(va_idx)
            cv_ref.append(evaluate_data(functools.partial(predict_numpy, net), val, task, prefix="cv_",
                                         budget_bytes=loader_budget_bytes(memory)))
            if quant != "fp32":
                X_cal = data.subset(tr_idx).calibration_rows(cal_batches * 32)
                qp = _predict_quantized(src, m, X_cal, quant, max_batch, cal_batches)
                cv_q.append(evaluate_data(qp, val, task, prefix="cv_", budget_bytes=loader_budget_bytes(memory)))
            else:
                cv_q.append(cv_ref[-1])
    torch.manual_seed(proj.train.seed)
    model = train_model(src.factory(), data, None, spec, progress=lambda *_: rep.advance(),
                        memory=memory)
    rep.done()
    net = export_net(model, src.task)
    ref_metrics = evaluate(lambda x: predict_numpy(net, x), src.X_test, src.y_test, task, prefix="test_")
    ref_metrics.update(_mean_metrics(cv_ref))

    # compression search over the variants the project allows, scored on a validation
    # split of the training rows; the winner is applied to the reference model
    from .compress import search_for_build

    cv_quant = quant
    rep.phase("searching compression variants")
    choice = search_for_build(src.factory, model, proj.compress, task=task, X_train=src.X_train,
                              y_train=src.y_train, spec=spec, profile=profile,
                              storage_bytes=storage_bytes, latency_budget_ms=latency_budget_ms,
                              max_batch=max_batch)
    rep.done()
    if choice.search is not None:
        rep.info("compression candidates (* shipped):\n" + choice.table())
    quant, prune_ratio, model = choice.quantization, choice.prune, choice.model
    net = export_net(model, src.task)
    rep.phase(f"quantizing ({quant}) and exporting")
    # >= 16 example rows: a 2-row example lets export guard conv models to batch <= 15
    example = torch.as_tensor(src.X_train[: max(2, min(32, max_batch))])
    res = export_program(net, example, max_batch=max_batch, quantize=quant,
                         calibration=calibration_batches(src.X_train, cal_batches))
    rep.done()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pte_path = tmp / "model.pte"
        pte_path.write_bytes(res.pte)
        rep.phase("verifying in the ExecuTorch runtime")
        program = load_program(pte_path, threads=1)  # loaded once: verify, metrics, plot
        verify_diff = _verify(src, res, program, max_batch)
        test_pred = run_rows(program, src.X_test, max_batch)
        del program
        shipped_metrics = evaluate(lambda x: test_pred, src.X_test, src.y_test, task, prefix="test_")
        if quant == cv_quant and prune_ratio == 0.0:  # CV ran the shipped variant
            shipped_metrics.update(_mean_metrics(cv_q))
        rep.phase("measuring memory per batch size")
        meas = measure_peaks(pte_path, max_batch)
        rep.done()
        if choice.shipped is None:  # one allowed variant: measured on this program, scored by CV
            metric = "cv_r2" if task == "regression" else "cv_accuracy"
            choice = choice.measure_single(
                pte_path, planned_bytes=res.planned_bytes, peak_bytes=int(meas["measured_peak_bytes"]["1"]),
                adapter=meas["adapter"], profile=profile, storage_bytes=storage_bytes,
                latency_budget_ms=latency_budget_ms, metric=metric, value=shipped_metrics.get(metric))
            rep.info("compression candidates (* shipped):\n" + choice.table())

        # fit: storage, and the inference budget less the profile's expected baseline
        pte_bytes = len(res.pte)
        peak1 = int(meas["measured_peak_bytes"]["1"])
        working = profile.working_budget_bytes(meas["adapter"])
        if pte_bytes > storage_bytes:
            raise BudgetError(
                f"model.pte is {format_size(pte_bytes)}, over the {format_size(storage_bytes)} storage "
                f"budget of {profile.name} by {format_size(pte_bytes - storage_bytes)}; "
                "compress more (compress.quantize, compress.prune) or raise --storage-budget"
            )
        if pte_bytes + peak1 > working:
            raise BudgetError(
                f"the model needs {format_size(pte_bytes + peak1)} at batch 1 but {profile.name} leaves "
                f"{format_size(working)} (budget {format_size(profile.memory_budget_bytes)} less baseline "
                f"{format_size(profile.baseline_bytes(meas['adapter']))}); compress the model or pick a larger target"
            )

        manifest = bundle_manifest(
            src, profile, res, model, storage_bytes=storage_bytes, quantization=quant,
            prune=prune_ratio, candidates=[dict(c.as_dict(), shipped=c is choice.shipped)
                                           for c in choice.candidates],
            ref_metrics=ref_metrics, shipped_metrics=shipped_metrics, measured=meas,
            build_info={"verify_max_abs_diff": verify_diff,
                        "train": proj.train.model_dump(mode="json"),
                        "data": {"train_rows": int(src.training.rows), "test_rows": int(len(src.X_test)),
                                 "builtin_example": src.builtin}})
        from .plots import write_plots

        write_plots(tmp, task=task, y_true=src.y_test,
                    y_pred=test_pred,
                    candidates=choice.candidates, shipped=choice.shipped,
                    classes=src.classes)
        _write_manifest(tmp, manifest)
        if sign_key is not None:
            sign_manifest(tmp, sign_key)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    arch = None
    if archive:
        arch = make_archive(out_dir, out_dir.with_name(out_dir.name + ".tar.gz"))
    secs = time.perf_counter() - t0
    return BuildResult(out=out_dir, manifest=manifest, seconds=secs,
                       summary=summary_lines(manifest, profile, secs), archive=arch,
                       reference=res.reference)


def bundle_manifest(
    src: ModelSource,
    profile: TargetProfile,
    res: ExportResult,
    model: torch.nn.Module,
    *,
    storage_bytes: int,
    quantization: Quantization,
    prune: float,
    candidates: list[dict[str, Any]],
    ref_metrics: dict[str, float],
    shipped_metrics: dict[str, float],
    measured: dict[str, Any],
    build_info: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of DESIGN.md for a verified, measured program (``files`` filled later)."""
    proj = src.project
    now = _dt.datetime.now(_dt.timezone.utc)
    n_out = int(res.reference(torch.as_tensor(src.X_test[:2])).shape[1])
    weights = sum(p.numel() for p in model.parameters()) * (1 if quantization != "fp32" else 4)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": proj.name,
        "version": proj.version or now.strftime("%Y.%m.%d-%H%M%S"),
        "task": proj.task,
        "target": {
            "name": profile.name, "arch": profile.arch,
            "memory_budget_bytes": profile.memory_budget_bytes,
            "storage_budget_bytes": storage_bytes,
            "baseline_rss_bytes": dict(profile.baseline_rss_bytes),
            "threads": profile.threads,
        },
        "inputs": [{"name": "x", "shape": [-1, *src.X_train.shape[1:]], "dtype": "float32"}],
        "outputs": [{"name": "y" if proj.task == "regression" else "probabilities",
                     "shape": [-1, n_out], "dtype": "float32"}],
        "max_batch": proj.export.max_batch,
        "shipped": quantization,
        "compression": {"quantization": quantization, "prune": prune},
        "candidates": candidates,
        "batch_dependent": quantization == "int8-dynamic",
        "memory": {
            "pte_bytes": len(res.pte),
            "planned_bytes": res.planned_bytes,
            "weights_bytes": int(weights),
            "measured_peak_bytes": {k: int(v) for k, v in measured["measured_peak_bytes"].items()},
        },
        "metrics": {"reference": ref_metrics, "shipped": shipped_metrics},
        "files": {},
        "versions": _versions(),
        "created": now.isoformat(timespec="seconds"),
        "build": {"measured_with": measured["adapter"], **build_info},
    }
    if proj.task == "classification":
        manifest["classes"] = src.classes
    return manifest


def _resolve_quant(q: str, profile: TargetProfile) -> Quantization:
    if q in ("none", "fp32"):
        return "fp32"
    if q == "auto":
        pref = profile.export.quantization
        return "int8" if pref == "auto" else pref  # type: ignore[return-value]
    return q  # type: ignore[return-value]


def _mean_metrics(ms: list[dict[str, float]]) -> dict[str, float]:
    if not ms:
        return {}
    return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}


def _write_manifest(d: Path, manifest: dict[str, Any]) -> None:
    files = {}
    for f in sorted(d.iterdir()):
        if f.is_file() and f.name not in ("manifest.json", "manifest.sig"):
            files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest["files"] = files
    Manifest.from_dict(manifest)  # the format we promise, checked before it is written
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if not (out_dir / "manifest.json").exists() and any(out_dir.iterdir()):
            raise BundleError(f"{out_dir} exists and is not a bundle; choose another --out")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def summary_lines(m: dict[str, Any], profile: TargetProfile, seconds: float) -> list[str]:
    ref, shp = m["metrics"]["reference"], m["metrics"]["shipped"]
    names = ["cv_rmse", "cv_r2", "test_rmse", "test_r2"] if m["task"] == "regression" else ["cv_accuracy", "test_accuracy"]
    lines = [f"built {m['name']} {m['version']} for {profile.name} in {seconds:.1f} s"]
    lines.append(f"  {'':10s}" + "".join(f"{n:>15s}" for n in names))
    for label, mm in (("fp32", ref), (m["shipped"], shp)):
        lines.append(f"  {label:10s}" + "".join(f"{mm[n]:15.4f}" if n in mm else f"{'-':>15s}" for n in names))
    mem = m["memory"]
    lines.append(
        f"  model.pte {format_size(mem['pte_bytes'])} (storage budget {format_size(m['target']['storage_budget_bytes'])}); "
        f"planned arena {format_size(mem['planned_bytes'])} at batch {m['max_batch']}; "
        f"measured peak {format_size(mem['measured_peak_bytes'][str(m['max_batch'])])} at batch {m['max_batch']}"
    )
    base = profile.baseline_bytes(m["build"]["measured_with"])
    lines.append(
        f"  inference budget {format_size(profile.memory_budget_bytes)}: baseline {format_size(base)} + "
        f"model {format_size(mem['pte_bytes'] + mem['measured_peak_bytes'][str(m['max_batch'])])} "
        f"leaves {format_size(profile.memory_budget_bytes - base - mem['pte_bytes'] - mem['measured_peak_bytes'][str(m['max_batch'])])}"
    )
    return lines
