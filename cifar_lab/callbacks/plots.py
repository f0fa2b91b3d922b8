"""Figures for the run reports: confusion matrix, training curves, misclassified images.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas directly,
so nothing here touches pyplot or needs a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from cifar_lab.fileio import atomic_output

NORMALIZE_MODES = (None, "true", "pred", "all")


def check_normalize(normalize: str | None) -> str | None:
    """``normalize`` as one of :data:`NORMALIZE_MODES` (``"none"``/``False`` mean no normalisation)."""
    if normalize in (None, False, "none", "None", ""):
        return None
    if normalize is True:  # `normalize=true` on the command line arrives as a YAML boolean
        return "true"
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of none, true, pred, all; got {normalize!r}")
    return normalize


def normalize_confusion(cm: Tensor, normalize: str | None) -> Tensor:
    """Counts as fractions of each true class (``true``), predicted class (``pred``) or all (``all``)."""
    cm = cm.double()
    normalize = check_normalize(normalize)
    if normalize is None:
        return cm
    if normalize == "true":
        total = cm.sum(dim=1, keepdim=True)
    elif normalize == "pred":
        total = cm.sum(dim=0, keepdim=True)
    else:
        total = cm.sum()
    return torch.where(total > 0, cm / total.clamp(min=1e-12), torch.zeros_like(cm))


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure (at its own dpi) as an ``(H, W, 3)`` uint8 array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """An ``(H, W, 3)`` uint8 image written to ``path`` as a PNG, atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Image.fromarray(image).save(tmp, format="png")
    return path


def save_figure(fig: Figure, path: str | Path) -> np.ndarray:
    """``fig`` rendered once and written to ``path`` as a PNG; the rendered image is returned for
    TensorBoard, so a figure shown in both places is drawn once. (Figures are laid out by
    ``tight_layout`` or in inches; ``savefig(bbox_inches="tight")`` drew each twice.)"""
    image = figure_to_array(fig)
    write_png(image, path)
    return image


def confusion_matrix_figure(
    cm: Tensor,
    class_names: Sequence[str],
    normalize: str | None = "true",
    title: str = "Confusion matrix",
    annotate_max_classes: int = 20,
) -> Figure:
    """Heat map of a ``(C, C)`` confusion matrix, rows = true class, columns = predicted class."""
    counts = cm.detach().cpu()
    values = normalize_confusion(counts, normalize).numpy()
    n = len(class_names)
    side = min(max(4.0, 0.55 * n + 2.0), 16.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot(1, 1, 1)
    vmax = 1.0 if check_normalize(normalize) else max(float(values.max()), 1.0)
    image = ax.imshow(values, interpolation="nearest", cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(n)
    fontsize = 9 if n <= 20 else max(4, int(180 / n))
    if n <= 20:
        ax.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right", rotation_mode="anchor",
                      fontsize=fontsize)
    else:
        ax.set_xticks(ticks, labels=list(class_names), rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels=list(class_names), fontsize=fontsize)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    suffix = {None: "counts", "true": "normalised over true class", "pred": "normalised over predicted class",
              "all": "normalised over all"}[check_normalize(normalize)]
    ax.set_title(f"{title} ({suffix})")
    if n <= annotate_max_classes:
        threshold = vmax / 2.0
        for i in range(n):
            for j in range(n):
                value = values[i, j]
                text = f"{value:.2f}" if check_normalize(normalize) else f"{int(round(value))}"
                ax.text(j, i, text, ha="center", va="center", fontsize=max(5, fontsize - 1),
                        color="white" if value > threshold else "black")
    fig.tight_layout()
    return fig


def curves_figure(history: Mapping[int, Mapping[str, float]], title: str = "Training curves") -> Figure:
    """Loss and accuracy per epoch for train and val from ``{epoch: {"train/loss": .., ...}}``."""
    fig = Figure(figsize=(11, 4))
    epochs = sorted(history)
    for col, (name, label) in enumerate((("loss", "Loss"), ("acc", "Accuracy"))):
        ax = fig.add_subplot(1, 2, col + 1)
        for stage, style in (("train", "-o"), ("val", "-s")):
            key = f"{stage}/{name}"
            points = [(e + 1, history[e][key]) for e in epochs if key in history[e]]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, markersize=3, label=stage)
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid_figure(
    images: Tensor,
    titles: Sequence[str],
    title: str = "Misclassified images",
    columns: int = 8,
) -> Figure:
    """A grid of ``(N, 3, H, W)`` uint8 images, each with a short title above it.

    One axes holds every image (``imshow`` with an ``extent`` per cell) and every title, placed
    in inches: a subplot per image with ``tight_layout`` took 2-4x as long to build and draw
    (docs/benchmarks.md, "Report figures": 32 images, 848 ms against 396 ms on a Zen 3).
    """
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    cell_w, cell_h, side, head = 1.7, 1.9, 1.35, 0.4  # inches: a cell, its image, the figure's title band
    fig = Figure(figsize=(cell_w * columns, cell_h * rows + head))
    ax = fig.add_axes((0.0, 0.0, 1.0, cell_h * rows / (cell_h * rows + head)))
    for i in range(n):
        row, col = divmod(i, columns)
        left, top = col * cell_w + (cell_w - side) / 2, (rows - row) * cell_h - 0.45
        ax.imshow(images[i].permute(1, 2, 0).cpu().numpy(), interpolation="nearest",
                  extent=(left, left + side, top - side, top))
        ax.text(col * cell_w + cell_w / 2, top + 0.05, titles[i], ha="center", va="bottom", fontsize=7)
    if n == 0:
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, cell_w * columns)
    ax.set_ylim(0, cell_h * rows)
    ax.set_aspect("auto")
    ax.axis("off")
    fig.suptitle(title)
    return fig


def denormalize(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """Normalised float images back to uint8 (uint8 input is returned as is)."""
    if x.dtype == torch.uint8:
        return x
    x = x.detach().float()
    if mean is not None and std is not None:
        m = torch.as_tensor(list(mean), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = x * s + m
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
