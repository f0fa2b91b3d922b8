"""``MODEL_CARD.md``: what a run trained, on what data, how well, how sure, and how to reproduce it.

Every training run writes one in its run directory (and ``reliability.png``); ``evaluate`` writes
a refreshed one in its own run directory, with the robustness summary when ``robustness=true``.
The card's numbers are those of the run's one test pass (its test-time augmentation views
included), as :class:`~cifar_lab.callbacks.reports.ClassificationReport` collected them; nothing
runs the test set again:

* the test accuracy, the run's ``test/acc``, with its 95% Wilson score interval for ``n`` test images;
* per-class precision and recall;
* calibration: the expected calibration error (``test/ece``, torchmetrics' L1 over the report's
  ``ece_bins`` equal-width confidence bins) and the reliability diagram of those bins.
"""

from __future__ import annotations

import copy
import math
import platform
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from cifar_lab.callbacks.reports import ClassificationReport
from cifar_lab.callbacks.tta import layer_in_test
from cifar_lab.models import trainable_params
from cifar_lab.fileio import atomic_write_text
from cifar_lab.runs.tags import notes_of, tags_of

__all__ = ["wilson_interval", "reliability_figure", "from_test_pass", "render", "write_model_card", "command_line",
           "card_for_run"]

PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "numpy", "onnxruntime", "cifar-lab")


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / total`` (95% for the default ``z``)."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def reliability_figure(bins: Mapping[str, Any], ece: float) -> Any:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration."""
    from matplotlib.figure import Figure

    count = len(bins["count"])
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(1, 1, 1)
    edges = [k / count for k in range(count)]
    ax.bar(edges, bins["accuracy"], width=1 / count, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE {ece:.4f})")
    ax.legend(loc="upper left")
    fig.tight_layout()  # (plots.save_figure draws once, without a second pass to crop)
    return fig


def from_test_pass(acc: float, views: int, report: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the card says of the test pass: ``acc`` (its ``test/acc``), its TTA ``views`` and, from the
    :class:`~cifar_lab.callbacks.reports.ClassificationReport` result ``report`` when the run had one,
    the image count, per-class precision/recall, the ECE and its bins."""
    results: dict[str, Any] = {"acc": float(acc), "views": int(views)}
    if report:
        summary, confmat = report["summary"], report["confmat"]
        results.update(images=int(summary["total"]), precision=[float(v) for v in summary["precision"]],
                       recall=[float(v) for v in summary["recall"]], support=[int(v) for v in summary["support"]],
                       predicted=[int(v) for v in confmat.sum(dim=0)], ece=float(report["ece"]), bins=report["bins"])
    return results


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


def render(facts: Mapping[str, Any], test: Mapping[str, Any] | None, class_names: Sequence[str],
           robustness: Mapping[str, Any] | None = None) -> str:
    """The card's Markdown; ``test`` is :func:`from_test_pass` (``None``: the run was not tested)."""
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
    lines += ["", *_test_lines(test, class_names)]
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
    return "\n".join(lines)


def _test_lines(test: Mapping[str, Any] | None, class_names: Sequence[str]) -> list[str]:
    if test is None:
        return ["## Test accuracy", "", "- not tested (test=false)", ""]
    acc, views = test["acc"], test["views"]
    seen = "one view per image" if views == 1 else f"the mean of {views} test-time augmentation views per image"
    if "images" not in test:
        return ["## Test accuracy", "", f"- accuracy: {100 * acc:.2f}% (the run's test/acc; {seen})",
                "- per-class precision and recall, calibration: not collected (the run has no callbacks.report)", ""]
    n = test["images"]
    k = round(acc * n)
    low, high = wilson_interval(k, n)
    lines = ["## Test accuracy", "", f"- accuracy: {100 * acc:.2f}% ({k:,} of {n:,} test images; {seen})",
             f"- 95% confidence interval (Wilson): {100 * low:.2f}% - {100 * high:.2f}%", "",
             "| class | precision | recall | support |", "|---|---:|---:|---:|"]
    for c, name in enumerate(class_names):
        precision = f"{test['precision'][c]:.3f}" if test["predicted"][c] else "-"
        recall = f"{test['recall'][c]:.3f}" if test["support"][c] else "-"
        lines.append(f"| {name} | {precision} | {recall} | {test['support'][c]} |")
    return lines + ["", "## Calibration", "",
                    f"- expected calibration error ({len(test['bins']['count'])} bins): {test['ece']:.4f}",
                    "- reliability diagram: ![reliability diagram](reliability.png)", ""]


def write_model_card(run_dir: Path, facts: Mapping[str, Any], net: nn.Module, test: Mapping[str, Any] | None,
                     class_names: Sequence[str], device: torch.device | str = "cpu",
                     robustness: Mapping[str, Any] | None = None) -> Path:
    """Write ``MODEL_CARD.md`` (and ``reliability.png`` when ``test`` has bins); ``net`` is described, not run."""
    from cifar_lab.callbacks.plots import save_figure

    # the count the run recorded (its network as built: a parameter frozen during training still counts)
    facts = {**facts, "params": facts.get("params") or trainable_params(net),
             "macs": _macs(net, int(facts.get("image_size", 32))), "machine": _machine(device)}
    text = render(facts, test, class_names, robustness)
    run_dir.mkdir(parents=True, exist_ok=True)
    if test is not None and test.get("bins"):
        save_figure(reliability_figure(test["bins"], test["ece"]), run_dir / "reliability.png")
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
    ``recorded`` is the run's ``metrics.json`` content (its test accuracy and compute); the rest of the
    test section comes from the trainer's callbacks (:func:`_test_pass`).
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
        "compute": (recorded or {}).get("compute"),
        "params": (recorded or {}).get("params"),
    }
    return write_model_card(run_dir, facts, net, _test_pass(trainer, recorded) if tested else None,
                            list(datamodule.classes), device=trainer.strategy.root_device, robustness=robustness)


def _test_pass(trainer: Any, recorded: Mapping[str, Any] | None) -> dict[str, Any]:
    """:func:`from_test_pass` of the trainer's last test pass: its test/acc, TTA views and report."""
    metrics = (recorded or {}).get("metrics") or {}
    acc = metrics.get("test/acc", trainer.callback_metrics.get("test/acc"))
    layer = layer_in_test(trainer.callbacks)
    views = len(layer.views) if layer is not None else 1
    report = next((c for c in trainer.callbacks if isinstance(c, ClassificationReport)), None)
    return from_test_pass(float(acc), views, report.results.get("test") if report else None)
