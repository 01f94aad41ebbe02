"""Command-line interface: ``roimae BIDS_DIR OUTPUT_DIR {pretrain,participant,group} [options]``.

Option names follow fMRIPrep / XCP-D (nipreps), including the underscore spellings
(``--participant_label``). ``roimae demo OUT_DIR`` writes the synthetic demo dataset;
``roimae import-model CKPT OUTPUT_DIR --from {neurostorm,swift}`` imports an upstream checkpoint
(:mod:`bidsapp.importer`). Errors are one line on standard error with a BEP027 exit code; ``-vv``
adds the traceback.

:mod:`bidsapp.cli.parser` turns the arguments into a :class:`~bidsapp.config.Config`,
:mod:`bidsapp.levels` runs its level, and :mod:`bidsapp.cli.demo` is the ``roimae demo`` command.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from bidsapp.caches import prepare_caches
from bidsapp.cli.parser import (
    LEVELS,
    build_demo_parser,
    build_import_parser,
    build_parser,
    config_from_args,
)
from bidsapp.config import check_paths
from bidsapp.errors import (
    ExitCode,
    RoimaeError,
    Terminated,
    UsageError,
    interruption_in,
    interruption_message,
)

__all__ = ["build_demo_parser", "build_import_parser", "build_parser", "config_from_args", "main"]


def _raise_terminated(signum: int, frame: object) -> NoReturn:
    # Once: a second SIGTERM (Slurm repeats it) must not interrupt the clean-up of the first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``roimae`` console script; returns the exit code.

    SIGTERM (a Slurm time limit, ``scancel``, ``docker stop``) is handled as SIGINT (Ctrl-C): the
    job unwinds, removing its temporary files, logs one line and exits 143 (130 for SIGINT).
    """
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:   # not the main thread (roimae called from a thread): leave signals alone
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupted(exc: KeyboardInterrupt) -> int:
    code = ExitCode.TERMINATED if isinstance(exc, Terminated) else ExitCode.INTERRUPTED
    print(f"roimae: {interruption_message(exc)} (exit {int(code)})", file=sys.stderr)
    return int(code)


def _import_model(args: argparse.Namespace) -> int:
    """``roimae import-model``: the upstream checkpoint -> ``OUTPUT_DIR/models/desc-NAME``."""
    if (args.atlas is None) != (args.atlas_labels is None):
        raise UsageError("--atlas and --atlas-labels must be given together")
    # Imported here, after parsing, as the demo's: torch and nibabel.
    from bidsapp.atlas import load_atlas
    from bidsapp.importer import import_model
    from bidsapp.logs import setup_logging

    setup_logging(args.verbosity)
    atlas = load_atlas(args.atlas, args.atlas_labels)
    import_model(args.checkpoint, args.output_dir.expanduser().absolute(), args.family, atlas=atlas,
                 desc=args.desc, overwrite=args.overwrite)
    return 0


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbosity = sum(a.count("v") for a in argv if a.startswith("-") and set(a[1:]) == {"v"})
    verbosity += argv.count("--verbose")
    try:
        # ``roimae demo OUT ...`` unless it reads as a BIDS-App call on a BIDS_DIR named demo.
        if argv and argv[0] == "demo" and not (len(argv) >= 3 and argv[2] in LEVELS):
            args = build_demo_parser().parse_args(argv[1:])
            # Imported here, after parsing: the demo and the levels import numpy, nibabel and
            # torch, which ``--help``, ``--version`` and usage errors must not wait for.
            from bidsapp.cli.demo import run_demo

            return run_demo(args)
        if argv and argv[0] == "import-model" and not (len(argv) >= 3 and argv[2] in LEVELS):
            return _import_model(build_import_parser().parse_args(argv[1:]))
        config = config_from_args(build_parser().parse_args(argv))
        # Before bidsapp.levels imports matplotlib: a cache directory that is not writable (a
        # read-only /tmp) or another user's moves into the work directory, which must not be
        # inside an input, hence the paths are checked first.
        check_paths(config)
        prepare_caches(config.work_dir)
        from bidsapp.levels import run  # here, not above: see the demo's import

        return run(config)
    except RoimaeError as exc:
        if verbosity >= 2:
            traceback.print_exc()
        print(f"roimae: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except Exception as exc:  # a bug: say so in one line unless -vv
        interruption = interruption_in(exc)
        if interruption is not None:
            return _interrupted(interruption)
        if verbosity >= 2:
            traceback.print_exc()
        print(f"roimae: internal error: {type(exc).__name__}: {exc} (rerun with -vv for the "
              "traceback and please report it)", file=sys.stderr)
        return int(ExitCode.FAILURE)
