"""Per-batch hooks reach only the callbacks that define them (cifar_lab/callbacks/dispatch.py)."""

from __future__ import annotations

from collections import Counter

import lightning as L
import pytest
import torch
from lightning.pytorch.profilers import PassThroughProfiler
from torch.utils.data import DataLoader, TensorDataset

from cifar_lab.callbacks.dispatch import BATCH_HOOKS, SkipIdleHooks
from conftest import NetModule

STEPS = 4


class Recording(PassThroughProfiler):
    """Counts the actions Lightning profiles: one ``[Callback]<state_key>.<hook>`` per dispatched hook."""

    def __init__(self) -> None:
        super().__init__()
        self.actions: Counter[str] = Counter()

    def start(self, action_name: str) -> None:
        self.actions[action_name] += 1


class EndsBatches(L.Callback):
    def __init__(self) -> None:
        self.ended = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ended += 1


class FitOnly(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.started = True


def _fit(callbacks: list[L.Callback]) -> Recording:
    data = TensorDataset(torch.randn(2 * STEPS, 4), torch.randint(0, 2, (2 * STEPS,)))
    profiler = Recording()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, profiler=profiler)
    trainer.fit(NetModule(torch.nn.Linear(4, 2)), DataLoader(data, batch_size=2))
    return profiler


def _dispatched(profiler: Recording, callback: L.Callback) -> dict[str, int]:
    prefix = f"[Callback]{callback.state_key}."
    return {name[len(prefix):]: n for name, n in profiler.actions.items()
            if name.startswith(prefix) and name[len(prefix):] in BATCH_HOOKS}


@pytest.mark.parametrize("skip", [False, True])
def test_a_batch_hook_is_dispatched_only_to_callbacks_that_define_it(skip: bool) -> None:
    ends, fit_only = EndsBatches(), FitOnly()
    profiler = _fit([ends, fit_only, *([SkipIdleHooks()] if skip else [])])
    assert ends.ended == STEPS and fit_only.started  # every hook a callback defines still runs
    if skip:
        assert _dispatched(profiler, ends) == {"on_train_batch_end": STEPS}
        assert _dispatched(profiler, fit_only) == {}
    else:  # Lightning alone: all six training-step hooks to every callback, each step
        assert _dispatched(profiler, fit_only)["on_before_zero_grad"] == STEPS
        assert len(_dispatched(profiler, fit_only)) == 6
    # after the fit the callbacks are as they were: nothing left on the instances
    assert not set(BATCH_HOOKS) & set(vars(fit_only)) and not set(BATCH_HOOKS) & set(vars(ends))


TRAINING_STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                       "on_before_zero_grad", "on_train_batch_end")


def _module_hooks(profiler: Recording, module: L.LightningModule, hooks: tuple[str, ...]) -> dict[str, int]:
    prefix = f"[LightningModule]{type(module).__name__}."
    return {name[len(prefix):]: n for name, n in profiler.actions.items()
            if name.startswith(prefix) and name[len(prefix):] in hooks}


def test_the_classifier_module_gets_no_per_batch_hook_calls_and_a_subclass_gets_its_own() -> None:
    """ClassifierModule leaves the six training-step module hooks non-callable, so Lightning dispatches
    none of them (each call has a profiler context); a subclass defining one gets it at every batch.
    The evaluation loops' batch hooks stay callable (Lightning inspects their signatures)."""
    from functools import partial

    from cifar_lab.module import ClassifierModule

    class EndsBatches(ClassifierModule):
        ended = 0

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            self.ended += 1

    def run(cls: type[ClassifierModule]) -> tuple[ClassifierModule, Recording]:
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
        module = cls(net=net, optimizer=partial(torch.optim.SGD, lr=0.1), memory_format="contiguous")
        data = TensorDataset(torch.randn(2 * STEPS, 3, 4, 4), torch.arange(2 * STEPS) % 10)
        profiler = Recording()
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, profiler=profiler)
        trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
        trainer.test(module, DataLoader(data, batch_size=2), verbose=False)
        return module, profiler

    plain, profiler = run(ClassifierModule)
    assert profiler.actions["[LightningModule]ClassifierModule.on_train_epoch_start"] == 1  # the profiler counts
    assert _module_hooks(profiler, plain, TRAINING_STEP_HOOKS) == {}
    assert set(_module_hooks(profiler, plain, BATCH_HOOKS)) == {"on_validation_batch_start", "on_validation_batch_end",
                                                                 "on_test_batch_start", "on_test_batch_end"}
    assert plain.global_step == STEPS
    sub, profiler = run(EndsBatches)
    assert sub.ended == STEPS
    assert _module_hooks(profiler, sub, TRAINING_STEP_HOOKS) == {"on_train_batch_end": STEPS}
