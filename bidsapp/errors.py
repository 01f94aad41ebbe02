"""Exit codes (BEP027) and the exceptions that carry them to the command line.

Every error a user can cause is raised as a :class:`RoimaeError` subclass; the CLI turns it into
one line on standard error and the matching exit code. Anything else is a bug (exit 1).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, following the BIDS-Apps BEP027 proposal (and ``sysexits.h``)."""

    OK = 0
    FAILURE = 1
    VALIDATION_FAILED = 16
    UNKNOWN_LEVEL = 17
    NOTHING_SELECTED = 18
    USAGE = 64
    BAD_DATA = 65
    NO_INPUT = 66
    CANNOT_CREATE_OUTPUT = 73
    IO_ERROR = 74
    #: Stopped by a signal: 128 + its number, as a shell reports a process the signal killed.
    INTERRUPTED = 130   # SIGINT (Ctrl-C)
    TERMINATED = 143    # SIGTERM (Slurm's time limit, scancel, docker stop, kill)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM.

    A :class:`KeyboardInterrupt`, so that SIGTERM unwinds exactly as Ctrl-C does: ``finally``
    blocks and context managers run (atomic writes remove their temporary files), nothing
    catches it as an ordinary error, and the CLI ends with one line and exit code 143.
    """


def interruption_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The SIGINT or SIGTERM behind ``exc``, if an interruption surfaced as another error.

    A signal that arrives while a module initialises (a lazy import) reaches the caller as
    ``ImportError: initialization failed`` with the :class:`KeyboardInterrupt` as its context.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def interruption_message(exc: KeyboardInterrupt) -> str:
    """One line on a job stopped by SIGINT or SIGTERM: what is kept and how to continue."""
    what = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted (SIGINT)"
    return (f"{what}; outputs completed so far are kept, unfinished ones removed: rerun the same "
            "command to continue (pretrain: with --resume)")


class RoimaeError(Exception):
    """An error with a message meant for the user and an exit code."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ValidationFailedError(RoimaeError):
    """The BIDS validator reported errors on the input dataset."""

    exit_code = ExitCode.VALIDATION_FAILED


class UnknownLevelError(RoimaeError):
    """The analysis level is not one of pretrain, participant, group."""

    exit_code = ExitCode.UNKNOWN_LEVEL


class NothingSelectedError(RoimaeError):
    """The filters (labels, space, filter file) select no data."""

    exit_code = ExitCode.NOTHING_SELECTED


class UsageError(RoimaeError):
    """The command line or configuration is wrong."""

    exit_code = ExitCode.USAGE


class BadDataError(RoimaeError):
    """An input file exists but its content cannot be used."""

    exit_code = ExitCode.BAD_DATA


class TrainingDivergedError(BadDataError):
    """Pretraining met a non-finite loss, gradient or weight (exit 65, as non-finite data).

    The data and settings given cannot be trained on (usually a too high ``--lr``); like a NaN
    voxel or a corrupt checkpoint, the numbers are unusable, hence "bad data" rather than a bug.
    """


class NoInputError(RoimaeError):
    """An input path does not exist or holds nothing usable."""

    exit_code = ExitCode.NO_INPUT


class CannotCreateOutputError(RoimaeError):
    """The output (or work) directory cannot be created or written."""

    exit_code = ExitCode.CANNOT_CREATE_OUTPUT


class IOFailureError(RoimaeError):
    """Reading or writing failed part-way (disk full, truncated file, ...)."""

    exit_code = ExitCode.IO_ERROR
