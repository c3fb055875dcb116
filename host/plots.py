"""PNG pictures for a bundle: how the shipped model predicts, and what the search tried.

    from toma_edge.host.plots import write_plots
    write_plots(bundle_dir, task="regression", y_true=y_test, y_pred=program_outputs,
                candidates=result.candidates, shipped=result.shipped)
    # bundle_dir/predictions.png (regression) or confusion.png (classification),
    # bundle_dir/candidates.png (validation metric against .pte size)

Matplotlib with the Agg backend (no display needed). Build calls this before it writes
the manifest, so the PNGs are listed in ``files`` with their sha256 like every other file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .compress import Candidate

__all__ = ["plot_predictions", "plot_confusion", "plot_candidates", "write_plots"]


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_predictions(path: Path, y_true: np.ndarray, y_pred: np.ndarray, *, title: str = "") -> Path:
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


def plot_candidates(path: Path, candidates: Sequence[Candidate], *, shipped: Candidate | None = None) -> Path:
    """Validation metric against .pte size (KiB) per candidate; crosses do not fit."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for c in candidates:
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
        paths.append(plot_confusion(out / "confusion.png", y_true, np.asarray(y_pred).argmax(axis=1),
                                    classes=classes, title=label))
    if candidates:
        paths.append(plot_candidates(out / "candidates.png", candidates, shipped=shipped))
    return paths
