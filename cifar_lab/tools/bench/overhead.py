"""Measurement 3, Lightning's overhead: ``Trainer.fit`` of the real module and datamodule
against a hand-written loop over the same model, data, precision and memory format (the
autotuned ones, as a training run would use), timed in pairs."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from cifar_lab.tools.bench.lab import autotuned, compose
from cifar_lab.tools.bench.callback_cost import bench_callbacks
from cifar_lab.tools.bench.paired import _paired_fit, _paired_steps
from cifar_lab.tools.bench.settings import Settings
from cifar_lab.tools.bench.timing import _median


def lightning_floor(steps: int, warmup: int) -> dict[str, float]:
    """Lightning's own per-step cost: ``Trainer.fit`` of a one-layer module on one in-memory batch
    (no augmentation, no metrics, no logging, plain SGD) against the same step by hand, paired as
    in :func:`_paired_fit`. What no change to cifar-lab's module or data path can remove."""
    import lightning as L

    x, y = torch.randn(128, 8), torch.randint(0, 2, (128,))

    def sgd_step(layer: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        loss = torch.nn.functional.cross_entropy(layer(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    class Bare(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class SameBatch:  # an iterable of one batch, given again at every step (a list would be many loaders)
        def __iter__(self):
            return iter([(x, y)] * steps)

    plain_layer = torch.nn.Linear(8, 2)
    plain_opt = torch.optim.SGD(plain_layer.parameters(), lr=0.01)
    lightning_times: list[float] = []
    plain_times: list[float] = []
    paired = _paired_steps(lambda: sgd_step(plain_layer, plain_opt), torch.device("cpu"), lightning_times, plain_times)

    with tempfile.TemporaryDirectory() as tmp:
        L.Trainer(default_root_dir=tmp, accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[paired]).fit(Bare(), train_dataloaders=SameBatch())
    diffs = [a - b for a, b in zip(lightning_times[warmup:], plain_times[warmup:])]
    return {"lightning_median_step_ms": 1000 * _median(lightning_times[warmup:]),
            "plain_median_step_ms": 1000 * _median(plain_times[warmup:]),
            "median_paired_difference_ms": 1000 * _median(diffs), "steps_timed": len(diffs)}


def bench_overhead(base_overrides: list[str], settings: Settings, device: torch.device, log,
                   model: str = "simple_cnn") -> dict[str, Any]:
    """Lightning's per-step cost over a hand-written loop, for ``model`` (autotuned) and for a
    tiny network in ``model``'s precision and memory format (where almost all of a step is
    overhead, so it shows in milliseconds)."""
    out: dict[str, Any] = {"model_name": model, "batch_size": settings.batch_size, "steps": settings.overhead_steps,
                           "method": "paired: one hand-written step after every Lightning step, medians"}
    tiny = [f"model={model}", "model.filters=[4,4]", "model.fc_units=8"] if model == "simple_cnn" else None
    for label, extra in (("model", [f"model={model}"]), ("tiny", tiny)):
        if extra is None:
            continue
        if label == "tiny":  # the model's precision and memory format: its overhead is what is estimated
            extra = [*extra, f"trainer.precision={out['precision']}", f"module.memory_format={out['memory_format']}"]
        settled = autotuned(compose([*base_overrides, *extra]), settings.batch_size)  # as a training run would
        cfg, decision = settled.cfg, settled.decision
        times: dict[str, list[float]] = {"lightning": [], "plain": []}
        for r in range(settings.overhead_repeats):
            res = _paired_fit(settled, settings.overhead_steps, settings.overhead_warmup, device)
            for k in times:
                times[k].extend(res[k])
            log(f"    {label:<6s} repeat {r + 1}/{settings.overhead_repeats}: median step "
                f"{1000 * _median(res['lightning']):7.2f} ms Lightning, {1000 * _median(res['plain']):7.2f} ms plain")
        lm, pm = _median(times["lightning"]), _median(times["plain"])
        diffs = [a - b for a, b in zip(times["lightning"], times["plain"])]
        out[label] = {"lightning_median_step_ms": 1000 * lm, "plain_median_step_ms": 1000 * pm,
                      "median_paired_difference_ms": 1000 * _median(diffs),
                      "ratio": lm / pm, "precision": str(cfg.trainer.precision),
                      "memory_format": str(cfg.module.memory_format), "autotune": decision.record(),
                      "steps_timed": len(diffs)}
        if label == "model":
            out["precision"], out["memory_format"] = str(cfg.trainer.precision), str(cfg.module.memory_format)
        if label == "tiny":  # the callbacks' cost where it shows: a step that is almost all overhead
            out["callbacks"] = bench_callbacks(autotuned(compose([*base_overrides, *extra, "callbacks=default"]),
                                                         settings.batch_size),
                                               settings.overhead_steps, settings.overhead_warmup,
                                               settings.overhead_repeats, device, log)
    out["ratio"] = out["model"]["ratio"]
    # many more steps: each is a fraction of a millisecond
    out["lightning_floor"] = lightning_floor(10 * settings.overhead_steps, 10 * settings.overhead_warmup)
    if "tiny" in out:
        # the tiny network's absolute per-step overhead added to the real model's step
        add = out["tiny"]["median_paired_difference_ms"]
        out["ratio_from_tiny_overhead"] = (out["model"]["plain_median_step_ms"] + add) / out["model"]["plain_median_step_ms"]
    return out
