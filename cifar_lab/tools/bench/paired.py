"""A Lightning ``fit`` and a hand-written step timed in pairs: each pair shares the machine's load
(the overhead and callback-cost measurements)."""

from __future__ import annotations

import tempfile
import time
from typing import Callable

import torch

from cifar_lab.tools.bench.lab import build_datamodule, lab_batches, lab_datamodule
from cifar_lab.tools.bench.timing import _sync
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
