"""Measurement 3, Lightning's overhead: ``Trainer.fit`` of the real module and datamodule
against a hand-written loop over the same model, data, precision and memory format (the
autotuned ones, as a training run would use), timed in pairs."""

from __future__ import annotations

import tempfile
import time
from typing import Any, Callable

import torch

from cifar_lab.tools.bench.lab import autotuned, build_datamodule, compose, lab_batches, lab_datamodule
from cifar_lab.tools.bench.settings import Settings
from cifar_lab.tools.bench.timing import _median, _sync
from cifar_lab.tools.bench.training import _optimizer, _train_step_fn


def _paired_steps(plain_step: Callable[[], None], device: torch.device, lightning_times: list[float],
                  plain_times: list[float]):
    """A callback that runs ``plain_step`` after every Lightning step and times both (see :func:`_paired_fit`)."""
    import lightning as L

    class PairedSteps(L.Callback):
        mark = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            _sync(device)
            self.mark = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(device)
            now = time.perf_counter()
            lightning_times.append(now - self.mark)
            with torch.enable_grad():
                plain_step()
            _sync(device)
            self.mark = time.perf_counter()
            plain_times.append(self.mark - now)

    return PairedSteps()


def _paired_fit(settled, steps: int, warmup: int, device: torch.device,
                callbacks: list | None = None) -> dict[str, list[float]]:
    """Step times of ``Trainer.fit`` and of a hand-written step, interleaved step by step.

    After every Lightning step a callback runs one hand-written step (its own module,
    optimizer and datamodule, same config) and times it; a Lightning step is the time
    from the end of that hand-written step to the end of the next Lightning step (batch
    fetch, hooks, training_step with its metrics and logging, backward, optimizer). Each
    pair shares the machine's load, which separate runs on a shared machine do not. ``callbacks``
    (a run's set, :func:`cifar_lab.tools.bench.callback_cost.default_callbacks`) join the timed
    Trainer, with a TensorBoard logger when they need one.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
    from lightning.pytorch.loggers import TensorBoardLogger

    from cifar_lab.builders.assemble import assemble

    cfg = settled.cfg
    lightning_times: list[float] = []
    plain_times: list[float] = []
    plain_dm = lab_datamodule(cfg, int(cfg.data.batch_size))
    plain_module = assemble(settled).module.to(device).train()
    plain_step = _train_step_fn(plain_module, _optimizer(cfg, plain_module.net.parameters()),
                                str(cfg.trainer.precision), device)
    plain_batches = lab_batches(plain_dm, device)
    paired = _paired_steps(lambda: plain_step(*next(plain_batches)),  # batch fetch + augmentation + step
                           device, lightning_times, plain_times)

    run = assemble(settled)
    dm, module = build_datamodule(cfg), run.module
    t = cfg.trainer
    callbacks = list(callbacks or [])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            default_root_dir=tmp, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
            precision=t.precision, max_steps=steps, max_epochs=-1,
            logger=TensorBoardLogger(tmp) if callbacks else False,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_progress_bar=False,
            enable_model_summary=any(isinstance(c, ModelSummary) for c in callbacks), num_sanity_val_steps=0,
            limit_val_batches=0, callbacks=[*callbacks, paired], log_every_n_steps=t.log_every_n_steps,
            use_distributed_sampler=False, gradient_clip_val=t.gradient_clip_val,
            accumulate_grad_batches=t.accumulate_grad_batches, benchmark=t.benchmark, deterministic=t.deterministic,
        )
        trainer.fit(module, datamodule=dm)
    plain_batches.close()
    return {"lightning": lightning_times[warmup:], "plain": plain_times[warmup:]}


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
            from cifar_lab.tools.bench.callback_cost import bench_callbacks

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
