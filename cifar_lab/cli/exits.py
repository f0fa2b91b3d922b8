"""How a command ends: a problem the user can fix is one line on stderr and its exit code.

Every command runs under :func:`exit_on_user_error` (``python -m cifar_lab.<command>`` through
:func:`run_command`); a Hydra app's ``main()`` also under :func:`exit_on_config_error`; a command's
imports under :func:`interrupted_while_starting`. The exit codes are those of
:mod:`cifar_lab.errors`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from cifar_lab.errors import EXIT_INTERRUPTED, EXIT_USER, TrainingInterrupted, UserError

__all__ = ["exit_on_user_error", "exit_on_config_error", "interrupted_while_starting", "run_command"]


def _keep_in(run_dir: Path | None, message: str) -> None:
    """A copy of the message in an existing run directory's error.txt (best effort, rank 0 only)."""
    if run_dir is None:
        return
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    try:
        if run_dir.is_dir():
            from cifar_lab.fileio import atomic_write_text  # torch's import: not before a command's guard

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
        from cifar_lab.config.compose import config_error  # Hydra's import: only when there is an error to word

        # a value of the command's own config that cannot be resolved (a self reference, a missing key)
        message = str(config_error(err))
        print(f"Error: {message}", file=sys.stderr, flush=True)
        _keep_in(run_dir, message)
        sys.exit(EXIT_USER)


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
        from cifar_lab.config.compose import config_error

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
