"""Measurement 2, training: images per second of whole training steps (data, forward,
backward, optimizer) per model, the reference loop against cifar-lab's batched path, and
the optional ablation over precision x memory format."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cifar_lab.tools.bench.lab import _open, compose, lab_batches, lab_datamodule
from cifar_lab.tools.bench.reference import reference_batches
from cifar_lab.tools.bench.settings import Settings
from cifar_lab.tools.bench.timing import _interleaved, _median, _sync


def _optimizer(cfg, params) -> torch.optim.Optimizer:
    from hydra.utils import instantiate

    return instantiate(cfg.optimizer)(params=params)


def _autocast(precision: str, device: torch.device):
    precision = str(precision)
    if precision.startswith("bf16") and "mixed" in precision or precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("16-mixed", "16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


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
    from cifar_lab import builders

    with _open(cfg):
        cfg.module.memory_format = "channels_last" if variant.channels_last else "contiguous"
        cfg.module.compile = variant.compile
    dm = lab_datamodule(cfg, bs)
    module = builders.build_module(cfg).to(device).train()
    dm.channels_last = module.channels_last  # what the module's setup() does in a Trainer
    step = _train_step_fn(module, _optimizer(cfg, module.net.parameters()), variant.precision, device)
    warmup = _Warmup(settings.train_warmup)

    def run() -> float:
        threads = torch.get_num_threads()
        if variant.threads:
            torch.set_num_threads(variant.threads)
        it = lab_batches(dm, device)
        try:
            return time_steps(it, step, warmup.take(), settings.train_steps, bs, device)
        finally:
            it.close()
            torch.set_num_threads(threads)

    return run


def bench_train(model: str, ref_dataset: Dataset, base_overrides: list[str], settings: Settings,
                device: torch.device, log) -> dict[str, Any]:
    from hydra.utils import instantiate

    bs = settings.batch_size if model == "simple_cnn" else settings.heavy_batch_size
    cfg = compose([*base_overrides, f"model={model}"])
    default = LabVariant(str(cfg.trainer.precision), cfg.module.memory_format == "channels_last", bool(cfg.module.compile))

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

    runners: dict[str, Callable[[], float]] = {"reference": reference, "cifar_lab": _lab_runner(cfg, default, bs, settings, device)}
    runs = _interleaved(settings.repeats, runners, log)
    result: dict[str, Any] = {
        "batch_size": bs,
        "reference": {"images_per_s": runs["reference"], "median": _median(runs["reference"]),
                      "settings": "PIL DataLoader (2 workers), float32, NCHW"},
        "cifar_lab": {"images_per_s": runs["cifar_lab"], "median": _median(runs["cifar_lab"]),
                      "settings": default.name},
        "speedup": _median(runs["cifar_lab"]) / _median(runs["reference"]),
    }
    if settings.ablation:
        variants = [LabVariant(p, cl) for p in ("32", "bf16-mixed") for cl in (False, True)]
        if model == "simple_cnn":
            best_threads = 1 if (os.cpu_count() or 1) > 1 else None
            if best_threads:
                variants.append(LabVariant(default.precision, default.channels_last, threads=best_threads))
        ab_runners = {v.name: _lab_runner(compose([*base_overrides, f"model={model}"]), v, bs, settings, device)
                      for v in variants}
        log(f"  ablation ({model}, batched path)")
        ab = _interleaved(max(1, settings.repeats // 2), ab_runners, log)
        result["ablation"] = {name: {"images_per_s": v, "median": _median(v)} for name, v in ab.items()}
    return result
