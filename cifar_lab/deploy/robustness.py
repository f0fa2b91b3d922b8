"""Accuracy under common corruptions: the table, ``robustness.json``, a heat map and TensorBoard scalars.

:func:`corruption_accuracy` runs a network over the test images under every corruption and
severity of :mod:`cifar_lab.deploy.corruptions` (generated batch by batch on the device). The
clean test set is not run again: the clean accuracy is the test pass's ``test/acc``, given by the
caller, so the network should be the one the test pass ran (its TTA views included,
:func:`cifar_lab.callbacks.tta.as_tested`). The summary has the clean accuracy, the accuracy per
corruption and severity, the mean over severities per corruption, the mean corruption accuracy
over all of them, and the relative drop ``(clean - corrupted) / clean`` of each.
``max_images=N`` measures the corruptions on a seeded random subset of N test images (a quicker,
noisier table; the clean accuracy stays that of every test image); a long pass prints progress
lines (:class:`cifar_lab.console.PassProgress`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import Tensor, nn

from cifar_lab.console import PassProgress
from cifar_lab.deploy.corruptions import corrupt
from cifar_lab.errors import ConfigError
from cifar_lab.fileio import atomic_write_text

__all__ = ["corruption_accuracy", "check_max_images", "subset", "write_report", "heatmap_figure", "format_table", "scalars"]


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


@torch.inference_mode()
def _accuracy(net: nn.Module, preprocess: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor,
              batch_size: int, device: torch.device, corruption: tuple[str, int], seed: int,
              autocast: Callable[[], ContextManager], progress: PassProgress | None = None) -> float:
    correct = 0
    detail = f"{corruption[0]} s{corruption[1]}"
    for start in range(0, len(images), batch_size):
        x = corrupt(images[start:start + batch_size].to(device), corruption[0], corruption[1], seed=seed + start)
        y = labels[start:start + batch_size].to(device)
        try:
            with autocast():
                logits = net(preprocess(x))
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            raise ConfigError(
                f"robustness: the model cannot run batches of {batch_size} images on {device} (out of memory); "
                f"lower corruption.batch_size (or data.eval_batch_size)"
            ) from None
        correct += int((logits.argmax(dim=1) == y).sum())
        if progress is not None:
            progress.advance(1, detail)
    return correct / len(images)


def check_max_images(value: Any) -> int | None:
    """``corruption.max_images``: null (all test images) or a count >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"corruption.max_images must be a whole number >= 1, or null for all test images; "
                          f"got {value!r}")
    return value


def subset(images: Tensor, labels: Tensor, max_images: int | None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random ``max_images`` of the images (in their order), or all of them."""
    max_images = check_max_images(max_images)
    if max_images is None or max_images >= len(images):
        return images, labels
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
    return images[keep], labels[keep]


def corruption_accuracy(net: nn.Module, preprocess: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor,
                        corruptions: Sequence[str], severities: Sequence[int], batch_size: int, clean_acc: float,
                        device: torch.device | str = "cpu", seed: int = 0,
                        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                        max_images: int | None = None, progress_every_s: float | None = None) -> dict[str, Any]:
    """Corrupted accuracy of ``net`` (eval mode) on uint8 ``images`` against ``clean_acc``; see the module docstring."""
    if batch_size < 1:
        raise ConfigError(f"corruption.batch_size must be >= 1, got {batch_size}")
    images, labels = subset(images, labels, max_images, seed)
    device = torch.device(device)
    net = net.to(device).eval()
    batches = -(-len(images) // batch_size)
    progress = PassProgress("robustness", batches * len(corruptions) * len(severities), "batches", progress_every_s)
    run = lambda corruption: _accuracy(net, preprocess, images, labels, batch_size, device,  # noqa: E731
                                       corruption, seed, autocast, progress)
    clean = float(clean_acc)
    table = {name: {str(s): run((name, s)) for s in severities} for name in corruptions}
    means = {name: sum(row.values()) / len(row) for name, row in table.items()}
    mean_acc = sum(means.values()) / len(means)
    drop = (lambda acc: (clean - acc) / clean if clean > 0 else 0.0)
    return {
        "images": len(images),
        "severities": [int(s) for s in severities],
        "clean_acc": clean,
        "accuracy": table,
        "mean_acc": means,
        "relative_drop": {name: drop(acc) for name, acc in means.items()},
        "mean_corruption_acc": mean_acc,
        "mean_relative_drop": drop(mean_acc),
    }


def scalars(result: dict[str, Any]) -> dict[str, float]:
    """TensorBoard scalars: ``robustness/<corruption>/<severity>``, per-corruption means, the overall mean."""
    values = {f"robustness/{name}/{s}": acc for name, row in result["accuracy"].items() for s, acc in row.items()}
    values.update({f"robustness/{name}/mean": acc for name, acc in result["mean_acc"].items()})
    values["robustness/clean_acc"] = result["clean_acc"]
    values["robustness/mean_corruption_acc"] = result["mean_corruption_acc"]
    values["robustness/mean_relative_drop"] = result["mean_relative_drop"]
    return values


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: accuracy (%) per corruption and severity, its mean and relative drop."""
    sev = result["severities"]
    head = "| corruption | " + " | ".join(f"s{s}" for s in sev) + " | mean | rel. drop |"
    rule = "|---|" + "---:|" * (len(sev) + 2)
    rows = [f"| {name} | " + " | ".join(f"{100 * row[str(s)]:.2f}" for s in sev)
            + f" | {100 * result['mean_acc'][name]:.2f} | {100 * result['relative_drop'][name]:.1f}% |"
            for name, row in result["accuracy"].items()]
    tail = (f"\nclean accuracy {100 * result['clean_acc']:.2f}%, mean corruption accuracy "
            f"{100 * result['mean_corruption_acc']:.2f}% (relative drop {100 * result['mean_relative_drop']:.1f}%), "
            f"{result['images']} test images\n")
    return "\n".join([head, rule, *rows]) + "\n" + tail


def heatmap_figure(result: dict[str, Any]) -> Any:
    """Accuracy (%) per corruption (rows) and severity (columns), annotated."""
    from matplotlib.figure import Figure

    names, sev = list(result["accuracy"]), result["severities"]
    values = [[100 * result["accuracy"][n][str(s)] for s in sev] for n in names]
    fig = Figure(figsize=(1.2 * len(sev) + 3, 0.45 * len(names) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if value < 60 else "black")
    ax.set_xticks(range(len(sev)), [str(s) for s in sev])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("severity")
    ax.set_title(f"Accuracy under corruption (%), clean {100 * result['clean_acc']:.1f}%")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()  # (plots.save_figure draws once, without a second pass to crop)
    return fig


def write_report(result: dict[str, Any], run_dir: Path) -> list[Path]:
    """``robustness.json``, ``robustness.md`` and ``robustness.png`` in ``run_dir``."""
    from cifar_lab.callbacks.plots import save_figure

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "robustness.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(run_dir / "robustness.md", "# Accuracy under corruption (%)\n\n" + format_table(result))
    save_figure(heatmap_figure(result), run_dir / "robustness.png")
    return [run_dir / "robustness.json", run_dir / "robustness.md", run_dir / "robustness.png"]
