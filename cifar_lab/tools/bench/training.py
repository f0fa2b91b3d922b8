"""Measurement 2, training: images per second of whole training steps (data, forward,
backward, optimizer) per model, the reference loop against cifar-lab's batched path with the
autotuned precision and memory format, and the optional ablation over every precision x
memory format pair autotune chooses from (so the choice is compared with the best pair)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cifar_lab.autotune import autocast_for as _autocast
from cifar_lab.tools.bench.lab import _open, assembled_module, autotuned, compose, lab_batches, lab_datamodule, model_overrides
from cifar_lab.tools.bench.reference import reference_batches
from cifar_lab.tools.bench.settings import Settings
from cifar_lab.tools.bench.timing import _interleaved, _median, _sync


CIFAR_TRAIN_IMAGES = 50_000


def _optimizer(cfg, params) -> torch.optim.Optimizer:
    from hydra.utils import instantiate

    return instantiate(cfg.optimizer)(params=params)


def _train_step_fn(forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, precision: str,
                   device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with _autocast(precision, device):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


class _Warmup:
    """Warm-up steps (allocations, oneDNN primitives, compilation) for a runner's first repeat only."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def take(self) -> int:
        steps, self.steps = self.steps, 0
        return steps


def time_steps(batches: Iterator, step: Callable, warmup: int, count: int, batch_size: int, device) -> float:
    """Images/s of ``count`` training steps; the first batch of a fresh iterator (worker
    start-up) and ``warmup`` steps are not timed."""
    pending = next(batches)
    for _ in range(warmup):
        step(*pending)
        pending = next(batches)
    _sync(device)
    start = time.perf_counter()
    for i in range(count):
        step(*pending)
        if i + 1 < count:
            pending = next(batches)
    _sync(device)
    return count * batch_size / (time.perf_counter() - start)


@dataclass
class LabVariant:
    """One way to run cifar-lab's batched path: precision, memory format, compile."""

    precision: str
    channels_last: bool
    compile: bool = False
    threads: int | None = None

    @property
    def name(self) -> str:
        name = f"{self.precision} {'channels_last' if self.channels_last else 'NCHW'}"
        if self.compile:
            name += " compile"
        if self.threads:
            name += f" {self.threads} thread{'s' if self.threads > 1 else ''}"
        return name


def _lab_runner(cfg, variant: LabVariant, bs: int, settings: Settings, device: torch.device) -> Callable[[], float]:
    with _open(cfg):  # the variant, stated: settling it measures nothing
        cfg.trainer.precision = variant.precision
        cfg.module.memory_format = "channels_last" if variant.channels_last else "contiguous"
        cfg.module.compile = variant.compile
    settled = autotuned(cfg, bs)
    dm = lab_datamodule(settled.cfg, bs)
    module = assembled_module(settled, device)
    step = _train_step_fn(module, _optimizer(cfg, module.net.parameters()), variant.precision, device)
    warmup = _Warmup(settings.train_warmup)

    def sized(batches: Iterator) -> Iterator:
        for batch in batches:  # the image size the steps ran at (a recipe may resize by epoch)
            run.image_size = int(batch[0].shape[-1])
            yield batch

    def run() -> float:
        threads = torch.get_num_threads()
        if variant.threads:
            torch.set_num_threads(variant.threads)
        it = sized(lab_batches(dm, device))
        try:
            return time_steps(it, step, warmup.take(), settings.train_steps, bs, device)
        finally:
            it.close()
            torch.set_num_threads(threads)

    run.image_size = None  # type: ignore[attr-defined]
    return run


def ablation_variants(default: LabVariant, device: torch.device) -> list[LabVariant]:
    """Every precision x memory format pair autotune chooses from on ``device`` (the default's
    pair among them, appended if an explicit setting lies outside), with the default's compile."""
    from cifar_lab.autotune import AUTO, candidate_pairs

    variants = [LabVariant(p, f == "channels_last", default.compile) for p, f in candidate_pairs(device, AUTO, AUTO)]
    if all((v.precision, v.channels_last) != (default.precision, default.channels_last) for v in variants):
        variants.append(LabVariant(default.precision, default.channels_last, default.compile))
    return variants


def default_over_best(ablation: dict[str, dict[str, Any]], default: str,
                      candidates: Iterable[str] | None = None) -> dict[str, Any]:
    """The default variant's median images/s over the best median among ``candidates`` (every
    ablation entry when None) that were timed, both taken from the same ablation."""
    names = [n for n in (ablation if candidates is None else candidates) if n in ablation]
    medians = {n: ablation[n].get("median") for n in names}  # None: not timed (the precision probe)
    timed = {n: float(m) for n, m in medians.items() if m is not None and math.isfinite(float(m))}
    if default not in timed:
        return {"ratio": None, "default": default, "best": max(timed, key=timed.get) if timed else None}
    best = max(timed, key=timed.get)
    return {"ratio": timed[default] / timed[best], "default": default, "default_images_per_s": timed[default],
            "best": best, "best_images_per_s": timed[best]}


def bench_train(model: str, ref_dataset: Dataset, base_overrides: list[str], settings: Settings,
                device: torch.device, log) -> dict[str, Any]:
    from hydra.utils import instantiate

    bs = settings.batch_for(model)
    overrides = [*base_overrides, *model_overrides(model)]
    cfg = compose(overrides)
    # what a training run of this config uses; compilation (module.compile=auto) is decided for a
    # run over CIFAR-10's training set
    settled = autotuned(cfg, bs, train_images=CIFAR_TRAIN_IMAGES)
    decision = settled.decision
    log(f"  autotune ({decision.source}, {decision.seconds:.1f} s): {decision.precision} {decision.memory_format}")
    default = LabVariant(decision.precision, decision.memory_format == "channels_last", bool(settled.cfg.module.compile))

    torch.manual_seed(0)
    net = instantiate(cfg.model, _convert_="all").to(device).train()
    ref_step = _train_step_fn(net, _optimizer(cfg, net.parameters()), "32", device)
    ref_warmup = _Warmup(settings.train_warmup)

    def reference() -> float:
        it = reference_batches(ref_dataset, bs, settings.workers, device)
        try:
            return time_steps(it, ref_step, ref_warmup.take(), settings.train_steps, bs, device)
        finally:
            it.close()

    lab = _lab_runner(cfg, default, bs, settings, device)
    runners: dict[str, Callable[[], float]] = {"reference": reference, "cifar_lab": lab}
    runs = _interleaved(settings.repeats, runners, log)
    result: dict[str, Any] = {
        "batch_size": bs,
        "overrides": model_overrides(model),
        "reference": {"images_per_s": runs["reference"], "median": _median(runs["reference"]),
                      "settings": "PIL DataLoader (2 workers), float32, NCHW"},
        "cifar_lab": {"images_per_s": runs["cifar_lab"], "median": _median(runs["cifar_lab"]),
                      "settings": default.name, "image_size": lab.image_size},
        "speedup": _median(runs["cifar_lab"]) / _median(runs["reference"]),
        "autotune": decision.record(),
    }
    if settings.ablation:
        result.update(bench_ablation(model, overrides, default, bs, settings, device, log))
    return result


def not_timed(cfg, variants: list[LabVariant], default: LabVariant, device: torch.device,
              probes: Callable[..., dict[str, dict[str, Any]]] | None = None) -> dict[str, dict[str, Any]]:
    """The ablation's pairs left untimed, autotune's rule: a precision the (cached) precision probe finds over
    ``autotune.probe_slower`` x fp32's time here (emulated bf16) -> its probe. The default is always timed."""
    from cifar_lab.autotune import precision_probes

    others = [v for v in variants if v.name != default.name]
    found = (probes or precision_probes)(cfg, [v.precision for v in others], device)
    return {v.name: found[v.precision] for v in others if (found.get(v.precision) or {}).get("note")}


def bench_ablation(model: str, overrides: list[str], default: LabVariant, bs: int, settings: Settings,
                   device: torch.device, log, probes: Callable[..., dict[str, dict[str, Any]]] | None = None,
                   runner: Callable[..., Callable[[], float]] | None = None) -> dict[str, Any]:
    """Every pair autotune chooses from, timed in interleaved repeats on the batched path, but those the
    precision probe rules out (listed with its ratio) and past the first repeat those over ``give_up_first`` x
    slower than the fastest; ``default_over_best`` among the timed pairs. (``probes``, ``runner``: tests.)"""
    from omegaconf import OmegaConf

    cfg = compose(overrides)
    variants = ablation_variants(default, device)
    pairs = [v.name for v in variants]
    untimed = not_timed(cfg, variants, default, device, probes)
    timed = [v for v in variants if v.name not in untimed]
    if model == "simple_cnn" and (os.cpu_count() or 1) > 1:  # the autotuned pair with one thread (no pair)
        timed.append(LabVariant(default.precision, default.channels_last, threads=1))
    runners = {v.name: (runner or _lab_runner)(compose(overrides), v, bs, settings, device) for v in timed}
    log(f"  ablation ({model}, batched path)" + "".join(f"; {n} {p['note']}" for n, p in untimed.items()))
    stopped: dict[str, str] = {}
    give_up = float(OmegaConf.select(cfg, "autotune.give_up_first", default=4.0))
    runs = _interleaved(max(1, settings.repeats // 2), runners, log, give_up=give_up, stopped=stopped)
    ablation: dict[str, dict[str, Any]] = {}
    for name in [*pairs, *runs]:
        if name in untimed:
            ablation[name] = {"images_per_s": [], "median": None, "note": untimed[name]["note"],
                              "probe_ratio": untimed[name].get("ratio")}
        elif name in runs:
            ablation[name] = {"images_per_s": runs[name], "median": _median(runs[name]),
                              **({"note": stopped[name]} if name in stopped else {})}
    # the autotuned pair against the best timed pair (threads variants aside)
    return {"ablation": ablation, "default_over_best": default_over_best(ablation, default.name, pairs)}
