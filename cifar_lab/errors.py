"""Errors a user can fix and their exit codes.

Each command (``train.py``, ``python -m cifar_lab.evaluate``, ``.predict``, ``.compare``,
``.export``, ``.tune``, and every job of a sweep) raises a :class:`UserError` subclass for a problem the
user can fix; the commands' guard (:func:`cifar_lab.cli.exits.exit_on_user_error`) turns it into its
message alone on stderr (no traceback) and the exit code below. Anything else is a bug and keeps its
traceback.

=========  ===================================================================
exit code  meaning
=========  ===================================================================
0          success
1          an unexpected error (a bug: the traceback is printed)
2          :class:`ConfigError`, :class:`DataError`, :class:`CheckpointError`,
           :class:`InputError`: fix the config, the data, the checkpoint or the input;
           :class:`ExportError`: the model cannot be exported, or the exported file
           disagrees with it beyond the tolerance
3          :class:`NonFiniteLossError`: the loss diverged
4          every job of a sweep failed (``python train.py -m``; each job's error.txt says why)
5          :class:`PeerLost`: another process of a multi-process (DDP) run died or stopped
           answering; the message names its rank and the resume command
128 + N    :class:`TrainingInterrupted` by signal N (130: Ctrl-C, 143: SIGTERM),
           after saving a resumable checkpoint
=========  ===================================================================
"""

from __future__ import annotations

import signal

__all__ = [
    "EXIT_USER",
    "EXIT_DIVERGED",
    "EXIT_SWEEP_FAILED",
    "EXIT_PEER_LOST",
    "UserError",
    "ConfigError",
    "UnsafeConfigError",
    "DataError",
    "CheckpointError",
    "InputError",
    "ExportError",
    "NonFiniteLossError",
    "PeerLost",
    "TrainingInterrupted",
]

EXIT_USER = 2
EXIT_DIVERGED = 3
EXIT_SWEEP_FAILED = 4
EXIT_PEER_LOST = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class UserError(Exception):
    """A problem the user can fix; the message names it and the fix."""

    exit_code = EXIT_USER


class ConfigError(UserError, ValueError):
    """A config value the run cannot work with; the message names the key, the value and what is allowed."""


class UnsafeConfigError(ConfigError):
    """A config read back from a file names something it may not build."""


class DataError(UserError, RuntimeError):
    """A data problem the user can fix; the message names the file and the remedy."""


class CheckpointError(ConfigError):
    """A missing, unreadable or unsuitable checkpoint (or run directory) named by ``ckpt_path`` and friends."""


class InputError(UserError):
    """Unusable input to a command (images to predict, run directories to compare, an option)."""


class ExportError(UserError):
    """A network that cannot be exported (an op without a mapping), or an export that fails its parity check."""


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a nan/inf loss or weights; the message names the step and likely causes."""

    exit_code = EXIT_DIVERGED


class PeerLost(UserError, RuntimeError):
    """Another process of a DDP run died or stopped answering; the message names its rank and how to resume."""

    exit_code = EXIT_PEER_LOST


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM. A KeyboardInterrupt, so a sweep stops too."""

    def __init__(self, message: str, signum: int = signal.SIGTERM, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)
