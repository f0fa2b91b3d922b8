"""When ``python train.py`` loads torch and Lightning: once its config composes, before the run starts.

Composing needs only Hydra (about a second); torch and Lightning take several more. A Hydra callback
(conf/hydra/default.yaml, ``callbacks.load_libraries``, the first listed) loads the training job's module
when Hydra makes it as a run or a sweep starts: after the config composed, before the run directory exists.
A command whose group choice or key does not compose is refused without them, and Ctrl-C while they load
is one line (:func:`cifar_lab.cli.exits.interrupted_while_starting`) that leaves nothing behind.
"""

from __future__ import annotations

from hydra.experimental.callback import Callback

from cifar_lab.cli.exits import interrupted_while_starting


class LoadTraining(Callback):
    """Made first of the run's Hydra callbacks (the modules of the others load torch too)."""

    def __init__(self) -> None:
        with interrupted_while_starting("train.py"):
            import cifar_lab.cli.train  # noqa: F401
