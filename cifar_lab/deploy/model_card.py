"""``MODEL_CARD.md``: what a run trained, on what data, how well, how sure, and how to reproduce it.

Every training run writes one in its run directory (and ``reliability.png``); ``evaluate`` writes
a refreshed one in its own run directory, with the robustness summary when ``robustness=true``.
The card's numbers come from one pass of the network over the test set:

* test accuracy with its 95% Wilson score interval for ``n`` test images;
* per-class precision and recall;
* calibration: the expected calibration error over 15 equal-width confidence bins (L1, as
  torchmetrics' ``MulticlassCalibrationError``) and the reliability diagram.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
from torch import Tensor, nn

from cifar_lab.models import trainable_params
from cifar_lab.fileio import atomic_write_text
from cifar_lab.runs.tags import notes_of, tags_of

__all__ = ["wilson_interval", "calibration", "reliability_figure", "test_predictions", "render", "write_model_card",
           "command_line", "card_for_run"]

PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "numpy", "onnxruntime", "cifar-lab")
ECE_BINS = 15


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / total`` (95% for the default ``z``)."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def calibration(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE (L1) and, per equal-width confidence bin, the mean confidence, accuracy and count."""
    confidence, predicted = probs.detach().float().max(dim=1)
    correct = (predicted == labels).float()
    index = torch.clamp((confidence * bins).ceil().long() - 1, 0, bins - 1)  # bins (k/B, (k+1)/B]
    count = torch.bincount(index, minlength=bins).float()
    conf_sum = torch.bincount(index, confidence, minlength=bins)
    acc_sum = torch.bincount(index, correct, minlength=bins)
    filled = count > 0
    mean_conf = torch.where(filled, conf_sum / count.clamp(min=1), torch.zeros_like(count))
    mean_acc = torch.where(filled, acc_sum / count.clamp(min=1), torch.zeros_like(count))
    ece = float(((mean_conf - mean_acc).abs() * count).sum() / max(len(labels), 1))
    return {"ece": ece, "confidence": mean_conf.tolist(), "accuracy": mean_acc.tolist(),
            "count": count.long().tolist()}


def reliability_figure(calib: Mapping[str, Any]) -> Any:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration."""
    from matplotlib.figure import Figure

    bins = len(calib["count"])
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(1, 1, 1)
    edges = [k / bins for k in range(bins)]
    ax.bar(edges, calib["accuracy"], width=1 / bins, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE {calib['ece']:.4f})")
    ax.legend(loc="upper left")
    return fig


@torch.inference_mode()
def test_predictions(net: nn.Module, preprocess: Callable[[Tensor], Tensor], images: Tensor, batch_size: int,
                     device: torch.device | str = "cpu",
                     autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> Tensor:
    """Softmax probabilities of ``net`` (eval mode) for uint8 ``images``, on the CPU."""
    net = net.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        with autocast():
            logits = net(preprocess(images[start:start + batch_size].to(device)))
        out.append(logits.float().softmax(dim=1).cpu())
    return torch.cat(out)


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _machine(device: torch.device | str) -> str:
    from cifar_lab.host import cpu_name

    text = f"CPU: {cpu_name()}"
    device = torch.device(device)
    if device.type == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name(device)}"
    return text


def _macs(net: nn.Module, image_size: int) -> int | None:
    """Multiply-accumulates per image (:func:`cifar_lab.models.flops.count_macs`), on a CPU copy."""
    from cifar_lab.models.flops import count_macs

    try:
        return int(count_macs(copy.deepcopy(net).float().cpu(), image_size))
    except Exception:  # noqa: BLE001 - a network the counter cannot run is described without MACs
        return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def render(facts: Mapping[str, Any], probs: Tensor | None, labels: Tensor | None, class_names: Sequence[str],
           robustness: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any] | None]:
    """The card's Markdown and the calibration numbers (``None`` without test predictions)."""
    lines = [f"# Model card: {facts['model']}", ""]
    macs = facts.get("macs")
    lines += ["## Model", "",
              f"- network: `{facts['model']}` (`{facts.get('target', '')}`)",
              f"- parameters: {facts['params']:,}",
              f"- multiply-accumulates per {facts['image_size']}x{facts['image_size']} image: "
              + (f"{macs:,}" if macs is not None else "not counted"),
              f"- checkpoint: `{facts.get('checkpoint') or 'none saved'}`", ""]
    splits = facts.get("splits") or {}
    lines += ["## Data", "", f"- source: {facts['data']}",
              "- split sizes: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                            for k, v in splits.items()),
              f"- classes ({len(class_names)}): {', '.join(class_names)}", ""]
    experiment = facts.get("experiment")
    lines += ["## Recipe", "", f"- experiment: {experiment if experiment not in (None, 'None') else 'none'}",
              "- overrides: " + (" ".join(f"`{o}`" for o in facts.get("overrides") or []) or "none"),
              f"- seed: {facts.get('seed')}", f"- wall time: {_duration(facts.get('wall_time_s'))}"]
    if facts.get("tags"):
        lines.append("- tags: " + ", ".join(f"`{t}`" for t in facts["tags"]))
    if facts.get("notes"):
        lines.append(f"- notes: {facts['notes']}")
    compute = facts.get("compute") or {}
    if compute.get("train_pflop"):
        lines.append(f"- training compute: {compute['train_pflop']:.4g} PFLOP ({compute['train_images']:,} images "
                     "trained; metrics.json `compute`)")
    lines.append("")
    calib = None
    if probs is not None and labels is not None and len(labels):
        predicted = probs.argmax(dim=1)
        n, k = len(labels), int((predicted == labels).sum())
        low, high = wilson_interval(k, n)
        calib = calibration(probs, labels)
        lines += ["## Test accuracy", "",
                  f"- accuracy: {100 * k / n:.2f}% ({k:,} of {n:,} test images; one view per image, no TTA)",
                  f"- 95% confidence interval (Wilson): {100 * low:.2f}% - {100 * high:.2f}%"]
        recorded = facts.get("recorded_acc")
        if recorded is not None and abs(recorded - k / n) > 1e-9:
            lines.append(f"- the run's test/acc in metrics.json: {100 * recorded:.2f}% (with the run's "
                         "test-time augmentation)")
        lines += ["",
                  "| class | precision | recall | support |", "|---|---:|---:|---:|"]
        for c, name in enumerate(class_names):
            tp = int(((predicted == c) & (labels == c)).sum())
            claimed, support = int((predicted == c).sum()), int((labels == c).sum())
            precision = f"{tp / claimed:.3f}" if claimed else "-"
            recall = f"{tp / support:.3f}" if support else "-"
            lines.append(f"| {name} | {precision} | {recall} | {support} |")
        lines += ["", "## Calibration", "",
                  f"- expected calibration error ({len(calib['count'])} bins): {calib['ece']:.4f}",
                  "- reliability diagram: ![reliability diagram](reliability.png)", ""]
    else:
        lines += ["## Test accuracy", "", "- not tested (test=false)", ""]
    if robustness:
        worst = min(robustness["mean_acc"], key=robustness["mean_acc"].get)
        lines += ["## Robustness (common corruptions, CIFAR-10-C style)", "",
                  f"- clean accuracy {100 * robustness['clean_acc']:.2f}%, mean corruption accuracy "
                  f"{100 * robustness['mean_corruption_acc']:.2f}% (relative drop "
                  f"{100 * robustness['mean_relative_drop']:.1f}%, severities {robustness['severities']})",
                  f"- hardest: {worst} ({100 * robustness['mean_acc'][worst]:.2f}%); table in robustness.md, "
                  "heat map robustness.png", ""]
    lines += ["## Machine and software", "", f"- {facts.get('machine', '')}",
              "- " + ", ".join(f"{k} {v}" for k, v in _versions().items()), "",
              "## Reproduce", "", "```", facts["command"], "```", ""]
    return "\n".join(lines), calib


def write_model_card(run_dir: Path, facts: Mapping[str, Any], net: nn.Module, preprocess: Callable[[Tensor], Tensor],
                     test: tuple[Tensor, Tensor] | None, class_names: Sequence[str], batch_size: int = 512,
                     device: torch.device | str = "cpu",
                     autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                     robustness: Mapping[str, Any] | None = None) -> Path:
    """Run ``net`` over the ``test`` images and write ``MODEL_CARD.md`` (and ``reliability.png``)."""
    from cifar_lab.callbacks.plots import save_figure

    # the count the run recorded (its network as built: a parameter frozen during training still counts)
    facts = {**facts, "params": facts.get("params") or trainable_params(net),
             "macs": _macs(net, int(facts.get("image_size", 32))), "machine": _machine(device)}
    probs = labels = None
    if test is not None:
        probs = test_predictions(net, preprocess, test[0], batch_size, device, autocast)
        labels = test[1].cpu()
    text, calib = render(facts, probs, labels, class_names, robustness)
    run_dir.mkdir(parents=True, exist_ok=True)
    if calib is not None:
        save_figure(reliability_figure(calib), run_dir / "reliability.png")
    path = run_dir / "MODEL_CARD.md"
    atomic_write_text(path, text)
    return path


def command_line(script: str, overrides: Sequence[str]) -> str:
    """A shell command that runs ``script`` with ``overrides`` (each quoted as the shell needs)."""
    return " ".join([script, *(shlex.quote(o) for o in overrides)])


def card_for_run(run_dir: Path, cfg: Any, net: nn.Module, datamodule: Any, trainer: Any, *, choices: Mapping[str, str],
                 overrides: Sequence[str], wall_time_s: float | None, checkpoint: str = "", tested: bool = True,
                 command: str | None = None, robustness: Mapping[str, Any] | None = None,
                 recorded: Mapping[str, Any] | None = None) -> Path:
    """The card of a run (train) or of an evaluation: facts from its config, data module and trainer.

    ``overrides`` are the training command's; ``command`` defaults to ``python train.py <overrides>``.
    ``recorded`` is the run's ``metrics.json`` content (its test accuracy and compute).
    """
    test_images = datamodule.splits["test"][0]
    splits = {name: "(the test set)" if name != "test" and split[0] is test_images else len(split[0])
              for name, split in datamodule.splits.items()}
    if "val" in splits and getattr(trainer, "limit_val_batches", None) == 0:
        splits["val"] = "none (no validation)"
    facts = {
        "model": choices.get("model") or str(cfg.model.get("_target_", "")).rsplit(".", 1)[-1],
        "target": str(cfg.model.get("_target_", "")),
        "image_size": int(getattr(datamodule.source, "image_size", 0) or datamodule.splits["test"][0].shape[-1]),
        "data": datamodule.source.describe(),
        "splits": splits,
        "experiment": choices.get("experiment"),
        "overrides": list(overrides),
        "seed": cfg.get("seed"),
        "tags": tags_of(cfg),
        "notes": notes_of(cfg),
        "wall_time_s": wall_time_s,
        "checkpoint": checkpoint,
        "command": command or command_line("python train.py", overrides),
        "recorded_acc": ((recorded or {}).get("metrics") or {}).get("test/acc"),
        "compute": (recorded or {}).get("compute"),
        "params": (recorded or {}).get("params"),
    }
    return write_model_card(run_dir, facts, net, datamodule.normalize,
                            datamodule.splits["test"] if tested else None, list(datamodule.classes),
                            batch_size=int(datamodule.eval_batch_size), device=trainer.strategy.root_device,
                            autocast=trainer.strategy.precision_plugin.forward_context, robustness=robustness)
