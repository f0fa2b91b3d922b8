"""Errors a user can fix, their exit codes, and the one guard every command runs under.

Each command (``train.py``, ``python -m cifar_lab.evaluate``, ``.predict``, ``.compare``,
``.export``, and every job of a sweep) raises a :class:`UserError` subclass for a problem the user can fix;
:func:`exit_on_user_error` turns it into its message alone on stderr (no traceback) and the
exit code below. Anything else is a bug and keeps its traceback.

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
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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
    "exit_on_user_error",
    "config_error",
    "exit_on_config_error",
    "run_command",
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


def _keep_in(run_dir: Path | None, message: str) -> None:
    """A copy of the message in an existing run directory's error.txt (best effort, rank 0 only)."""
    if run_dir is None:
        return
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    try:
        if run_dir.is_dir():
            from cifar_lab.fileio import atomic_write_text

            atomic_write_text(run_dir / "error.txt", message + "\n")
    except OSError:
        pass


@contextmanager
def exit_on_user_error(run_dir: Path | None = None) -> Iterator[None]:
    """Run a command's body: a :class:`UserError` prints ``Error: <message>`` and exits with its code.

    With ``run_dir`` the message is also kept in ``<run_dir>/error.txt``. An interruption
    prints where the resumable checkpoint is and exits with 128 + the signal number.
    """
    from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

    try:
        yield
    except UserError as err:
        print(f"Error: {err}", file=sys.stderr, flush=True)
        _keep_in(run_dir, str(err))
        sys.exit(err.exit_code)
    except TrainingInterrupted as err:
        print(str(err), file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except (InterpolationResolutionError, OmegaConfBaseException) as err:
        # a value of the command's own config that cannot be resolved (a self reference, a missing key)
        message = str(config_error(err))
        print(f"Error: {message}", file=sys.stderr, flush=True)
        _keep_in(run_dir, message)
        sys.exit(EXIT_USER)


def config_error(err: BaseException) -> ConfigError:
    """One :class:`ConfigError` for a config that does not compose: a YAML syntax error (with its
    file, line and column), an unknown group, option or key, or a bad override."""
    import yaml

    cause = err
    while cause.__cause__ is not None and not isinstance(cause, yaml.YAMLError):
        cause = cause.__cause__
    if isinstance(cause, yaml.YAMLError):
        where = " ".join(str(cause).split())
        return ConfigError(f"a config file is not valid YAML: {where}; fix the file at that line")
    lines = []
    for line in (line.strip() for line in str(err).strip().splitlines()):
        if line.startswith(("full_key:", "object_type", "reference_type", "value:", "Set the environment",
                            "Config search path")):
            break
        if line:
            lines.append(line)
    text, options = " ".join(lines) or type(err).__name__, ""
    if "Available options" in text:  # Hydra lists one option per line: keep them on one
        head, _, rest = text.partition("Available options")
        label, _, names = rest.partition(":")
        text, options = head.strip(), f" Available options{label}: {', '.join(names.split())}"
    return ConfigError(f"cannot compose the config: {text}{options}")


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Around a Hydra app's ``main()``: a config that does not compose is one message and exit code 2.

    Needs ``HYDRA_FULL_ERROR=1`` so Hydra hands its composition errors on instead of printing a
    traceback itself; the job function runs under :func:`exit_on_user_error`, so anything else
    reaching here is a bug and keeps its traceback.
    """
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        print(f"Error: {config_error(err)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER)


@contextmanager
def interrupted_while_starting(command: str) -> Iterator[None]:
    """Around a command's imports (torch, Lightning, Hydra: seconds): Ctrl-C there is one line and exit 130,
    not a traceback from inside whichever library was loading. Nothing has been read or written yet."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"Error: interrupted (Ctrl-C) while {command} was starting; nothing was done", file=sys.stderr,
              flush=True)
        sys.exit(EXIT_INTERRUPTED)


def run_command(run: Callable[..., Any], doc: str | None, argv: Sequence[str] | None = None) -> None:
    """A ``python -m cifar_lab.<command> key=value ...`` entry: ``-h`` prints ``doc``, user errors are one message."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(doc)
        return
    from cifar_lab.console import quiet_third_party

    quiet_third_party()
    try:
        with exit_on_user_error():
            run(args, logging_to_file=True)
    except KeyboardInterrupt:
        # nothing half-written is left: outputs are renamed into place only when whole
        print("Error: interrupted (Ctrl-C); no output was replaced by a partial file", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
