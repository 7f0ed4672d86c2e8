"""Matplotlib figures of an evaluation: confusion matrix, training curves, t-SNE.

Each function writes one PNG and returns its path. The Agg backend is used so figures
render on headless machines (CI, Kubeflow pods) without a display.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

STAGE_COLORS = {1: "#dbe9f6", 2: "#fde9d9"}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return path


def confusion_matrix_png(matrix, class_names: list[str], path: Path, title: str = "Confusion matrix") -> Path:
    """Annotated heatmap: rows = true class, columns = predicted; colour = row share,
    so a rare class's errors are as visible as a common one's; text = counts."""
    plt = _plt()
    m = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape, dtype=float), where=rows > 0)
    side = min(max(4.0, 0.55 * n + 2.0), 22.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n), labels=class_names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 40:  # beyond that the numbers are unreadable anyway
        size = 9 if n <= 15 else 6
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=size,
                        color="white" if share[i, j] > 0.5 else "black")
    return _save(fig, path)


def _finite(values) -> bool:
    return any(v is not None and isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def curves_png(history: list[dict], path: Path, select_metric: str | None = None) -> Path | None:
    """Loss (train/val) and validation metrics per epoch, stages shaded and labelled.

    Epochs are numbered across stages in history order, so stage 2 follows stage 1.
    Returns None (no file) when the history has no usable records.
    """
    records = [r for r in history if isinstance(r, dict)]
    if not records:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    x = np.arange(1, len(records) + 1)
    stages = [r.get("stage") for r in records]

    def series(key):
        return [r.get(key) if isinstance(r.get(key), (int, float)) else float("nan") for r in records]

    # The selection metric and the two headline ones; all of them would overlap
    # (accuracy and weighted recall are the same number).
    wanted = [f"val_{select_metric}"] if select_metric and select_metric != "neg_loss" else []
    wanted += ["val_accuracy", "val_macro_f1"]
    val_keys = [k for k in dict.fromkeys(wanted) if _finite(series(k))]

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for ax in (ax_loss, ax_metric):
        start = 0
        for i in range(1, len(records) + 1):  # shade runs of equal stage
            if i == len(records) or stages[i] != stages[start]:
                st = stages[start]
                ax.axvspan(x[start] - 0.5, x[i - 1] + 0.5, color=STAGE_COLORS.get(st, "#eeeeee"), zorder=0)
                ax.text((x[start] + x[i - 1]) / 2, 1.01, f"stage {st}", transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=9)
                start = i
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (across stages)")
        ax.grid(alpha=0.3)
        ax.set_xlim(0.5, len(records) + 0.5)
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        if _finite(series(key)):
            ax_loss.plot(x, series(key), style, label=key.replace("_", " "), markersize=4)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss", pad=18)
    for key in val_keys:
        label = key.replace("_", " ") + (" (selects best epoch)" if key == f"val_{select_metric}" else "")
        ax_metric.plot(x, series(key), "-o", label=label, markersize=4)
    ax_metric.set_ylabel("validation metric")
    ax_metric.set_title("Validation metrics", pad=18)
    for ax in (ax_loss, ax_metric):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def tsne_png(panels: list[tuple[str, np.ndarray]], labels, class_names: list[str], path: Path,
             note: str = "") -> Path:
    """Side-by-side scatter plots of 2-D embeddings, one per (title, points) panel,
    coloured by true class with one shared legend."""
    plt = _plt()
    labels = np.asarray(labels)
    n = len(class_names)
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "gist_ncar")
    colors = [cmap(i % cmap.N) if n <= 20 else cmap(i / max(n - 1, 1)) for i in range(n)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        for c in range(n):
            sel = labels == c
            if sel.any():
                ax.scatter(pts[sel, 0], pts[sel, 1], s=12, color=colors[c], label=class_names[c],
                           alpha=0.85, linewidths=0)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    if n <= 30:
        right = 0.9 if len(panels) > 1 else 0.8
        fig.tight_layout(rect=(0, 0.04 if note else 0, right, 1))
        fig.legend(handles, names, loc="center left", bbox_to_anchor=(right, 0.5), title="true class",
                   fontsize=8, markerscale=1.5, frameon=False)
    else:
        fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, color="#555555")
    return _save(fig, path)
