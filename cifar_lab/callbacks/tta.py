"""Test-time augmentation: average the softmax over flipped and shifted views of each batch.

Three layers, from general to specific:

* :func:`tta_views` and :func:`tta_probs` (:mod:`cifar_lab.models.tta`): the views and the averaging
  for any ``logits = f(x)``;
* :class:`TestTimeAugmentation` (:mod:`cifar_lab.models.tta`): an ``nn.Module`` wrapper around a
  network; its output is the log of the averaged probabilities, so ``softmax``/``argmax``/cross-entropy
  of it are the TTA probabilities, predictions and loss;
* :class:`TTACallback`: switches a LightningModule's ``forward`` to the TTA version for the
  chosen stages (test and predict by default) and back afterwards.

One layer only: views of views would multiply the work (10 x 10 forward passes per image) for an
average nobody asked for, so :func:`check_single_layer` refuses two enabled callbacks on one
stage before the trainer is built, and a callback never patches a ``forward`` that another one
already patched. ``python -m cifar_lab.evaluate tta.enabled=true`` on a run whose config already
applies TTA at test replaces the run's layer with its own (:func:`replace_run_tta`).
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
from torch import Tensor, nn

from cifar_lab.errors import ConfigError
from cifar_lab.models.tta import PADDING_MODES, TestTimeAugmentation, probs_to_logits, tta_probs, tta_views


class TTACallback(L.Callback):
    """Test-time augmentation for a LightningModule whose steps call ``self(x)``.

    For each stage in ``stages`` (``test``, ``predict``, ``validate``) the module's ``forward``
    is replaced by the TTA average at the stage start and restored at its end. The step then
    sees log-probabilities as logits, so its loss, accuracy and calibration measure the TTA
    prediction. ``enabled=false`` turns it into a no-op, which keeps configs simple.
    """

    def __init__(self, flip: bool = True, translate: int = 0, padding_mode: str = "reflect",
                 stages: Sequence[str] = ("test", "predict"), enabled: bool = True,
                 shifts: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        unknown = set(stages) - {"test", "predict", "validate"}
        if unknown:
            raise ValueError(f"TTACallback stages must be among test, predict, validate; got {sorted(unknown)}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"tta padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.views = tta_views(flip, translate, shifts)
        self.padding_mode = padding_mode
        self.stages = tuple(stages)
        self.enabled = enabled
        self._patched = False

    def applies_to(self, stage: str) -> bool:
        """Whether this callback averages views in ``stage`` (enabled, listed, more than one view)."""
        return self.enabled and stage in self.stages and len(self.views) > 1

    def describe(self) -> str:
        return f"{len(self.views)} views ({', '.join(self.stages)})"

    def _install(self, pl_module: L.LightningModule, stage: str) -> None:
        if not self.applies_to(stage) or self._patched:
            return
        if "forward" in vars(pl_module):
            raise ConfigError(f"test-time augmentation is applied twice in {stage}: the module's forward is "
                              "already replaced by another TTA layer; keep one TTACallback per stage")
        plain_forward = pl_module.forward  # the bound method of the class
        views, padding_mode = self.views, self.padding_mode

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            fn = lambda v: plain_forward(v, *args, **kwargs)  # noqa: E731
            return probs_to_logits(tta_probs(fn, x, views, padding_mode))

        pl_module.forward = forward  # instance attribute shadows the method
        self._patched = True

    def _remove(self, pl_module: L.LightningModule) -> None:
        if self._patched:
            vars(pl_module).pop("forward", None)
            self._patched = False

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(pl_module, "test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(pl_module, "predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(pl_module, "validate")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove(pl_module)


def check_single_layer(callbacks: Sequence[Any]) -> None:
    """Refuse two enabled :class:`TTACallback` on one stage (one clear line, before any work)."""
    for stage in ("test", "predict", "validate"):
        layers = [c for c in callbacks if isinstance(c, TTACallback) and c.applies_to(stage)]
        if len(layers) > 1:
            raise ConfigError(f"{len(layers)} test-time augmentation callbacks apply in {stage} "
                              f"({'; '.join(c.describe() for c in layers)}); views of views are never averaged: "
                              "keep one (set enabled: false on the others)")


def layer_in_test(callbacks: Sequence[Any]) -> TTACallback | None:
    """The TTA callback that averages views in test (:func:`check_single_layer` allows one), else None."""
    return next((c for c in callbacks if isinstance(c, TTACallback) and c.applies_to("test")), None)


def as_tested(net: nn.Module, callbacks: Sequence[Any]) -> nn.Module:
    """``net`` as the test pass runs it: inside the views of the TTA callback that applies in test, if any."""
    layer = layer_in_test(callbacks)
    return net if layer is None else TestTimeAugmentation(net, padding_mode=layer.padding_mode, views=layer.views)


def replace_run_tta(callbacks: list[Any], requested: TTACallback) -> tuple[list[Any], list[TTACallback]]:
    """``callbacks`` with ``requested`` in place of every TTA layer that would also apply in test.

    Returns the new list and the layers it removed (for a line saying so).
    """
    replaced = [c for c in callbacks if isinstance(c, TTACallback) and c.applies_to("test")]
    kept = [c for c in callbacks if not any(c is r for r in replaced)]
    return [*kept, requested], replaced
