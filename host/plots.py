"""PNG pictures for a bundle: how the shipped model predicts, and what the search tried.

    from toma_edge.host.plots import write_plots
    write_plots(bundle_dir, task="regression", y_true=y_test, y_pred=program_outputs,
                candidates=result.candidates, shipped=result.shipped)
    # bundle_dir/predictions.png (regression) or confusion.png (classification),
    # bundle_dir/candidates.png (validation metric against .pte size)
    plot_memory_log("mem.jsonl", "mem.png", budget_bytes=B)   # a MemoryMonitor log

Matplotlib with the Agg backend (no display needed). Build calls this before it writes
the manifest, so the PNGs are listed in ``files`` with their sha256 like every other file.
Every plot of the package lives here, in the host: the core and the device carry no
matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .compress import Candidate

__all__ = ["plot_predictions", "plot_confusion", "plot_candidates", "write_plots",
           "plot_memory_log"]


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_predictions(path: Path, y_true: np.ndarray, y_pred: np.ndarray, *,
                     title: str = "") -> Path:
    """Scatter of true against predicted values (every output), with the y = x line."""
    from sklearn.metrics import r2_score

    plt = _pyplot()
    yt = np.asarray(y_true, dtype=np.float64).reshape(-1)
    yp = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(yt, yp, s=8, alpha=0.6)
    lo, hi = float(min(yt.min(), yp.min())), float(max(yt.max(), yp.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("true value")
    ax.set_ylabel("predicted value")
    ax.set_title(f"{title}test R2 {r2_score(yt, yp):.4f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(path: Path, y_true: np.ndarray, y_pred: np.ndarray, *,
                   classes: Sequence[str] | None = None, title: str = "") -> Path:
    """Confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    yt = np.asarray(y_true).reshape(-1).astype(int)
    yp = np.asarray(y_pred).reshape(-1).astype(int)
    n = len(classes) if classes else int(max(yt.max(), yp.max())) + 1
    cm = confusion_matrix(yt, yp, labels=list(range(n)))
    names = list(classes) if classes else [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n), dpi=100)
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(n), names)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}test accuracy {np.trace(cm) / max(1, cm.sum()):.2%}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_candidates(path: Path, candidates: Sequence[Candidate], *,
                    shipped: Candidate | None = None) -> Path:
    """Validation metric against .pte size (KiB) per candidate; crosses do not fit."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for c in [c for c in candidates if not c.dropped]:  # dropped: nothing measured
        x, y = c.pte_bytes / 1024, c.value
        ax.scatter([x], [y], marker="o" if c.fits else "x", s=40,
                   color="tab:blue" if c.fits else "tab:red")
        ax.annotate(f"{c.quantization} p{c.prune:g}", (x, y), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if shipped is not None:
        ax.scatter([shipped.pte_bytes / 1024], [shipped.value], s=160, facecolors="none",
                   edgecolors="tab:green", linewidths=2, label="shipped")
        ax.legend(loc="lower right")
    ax.set_xlabel("model.pte size (KiB)")
    ax.set_ylabel(candidates[0].metric if candidates else "validation metric")
    ax.set_title("compression candidates (x: does not fit the target)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(out_dir: str | Path, *, task: str, y_true: np.ndarray, y_pred: np.ndarray,
                candidates: Sequence[Candidate] = (), shipped: Candidate | None = None,
                classes: Sequence[str] | None = None) -> list[Path]:
    """Write the bundle's PNGs into ``out_dir``; ``y_pred`` is the program's raw output
    (values for regression, class probabilities for classification)."""
    out = Path(out_dir)
    label = f"{shipped.label}: " if shipped is not None else ""
    paths = []
    if task == "regression":
        paths.append(plot_predictions(out / "predictions.png", y_true, y_pred, title=label))
    else:
        paths.append(plot_confusion(out / "confusion.png", y_true,
                                    np.asarray(y_pred).argmax(axis=1), classes=classes,
                                    title=label))
    if candidates:
        paths.append(plot_candidates(out / "candidates.png", candidates, shipped=shipped))
    return paths


def plot_memory_log(
    jsonl_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    budget_bytes: int | None = None,
    *,
    title: str = "memory over time",
) -> Path:
    """Draw RSS (MiB) over time (s) from a :class:`toma_edge.probes.MemoryMonitor` log,
    with the budget (bytes; default: the one in the log's header). Phases from ``mark()``
    are shaded and named. Returns the PNG path."""
    from ..probes import read_memory_log

    plt = _pyplot()
    header, rows = read_memory_log(jsonl_path)
    if budget_bytes is None:
        budget_bytes = header.get("budget_bytes")
    mib = float(1 << 20)
    t = [r["t_s"] for r in rows]
    rss = [r["rss_bytes"] / mib for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.plot(t, rss, lw=1.2, label="RSS")
    if budget_bytes:
        ax.axhline(budget_bytes / mib, color="tab:red", ls="--", lw=1,
                   label=f"budget {budget_bytes / mib:.0f} MiB")
    _shade_phases(ax, t, rows, low=min(rss) if rss else 0.0)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _shade_phases(ax: Any, t: list[float], rows: list[dict[str, Any]], *, low: float) -> None:
    """Shade labelled phases, alternating so short neighbours stay apart; names run upwards
    from the bottom of each phase so they never overlap."""
    start = 0
    phase = 0
    span = (t[-1] - t[0]) if len(t) > 1 else 1.0
    next_x = float("-inf")  # phases that begin together get their names side by side
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].get("label", "") != rows[start].get("label", ""):
            label = rows[start].get("label", "")
            if label and t:
                ax.axvspan(t[start], t[i - 1], alpha=0.10 if phase % 2 else 0.22,
                           color="tab:gray", lw=0)
                x = max(t[start], next_x)
                ax.text(x, low, " " + label, fontsize=7, rotation=90, va="bottom", ha="left")
                next_x = x + 0.025 * span
                phase += 1
            start = i
