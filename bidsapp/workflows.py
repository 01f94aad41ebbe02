"""From a validated :class:`~bidsapp.config.Config` to the level that does the work.

Data flows one way: CLI -> config -> this module -> the level's workflow -> writers.
"""

from __future__ import annotations

import argparse
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

from bidsapp.config import READOUTS, Config
from bidsapp.distributed import env_rank
from bidsapp.errors import NoInputError, UsageError, interruption_in, interruption_message
from bidsapp.io import atomic_write_text, ensure_dir
from bidsapp.logs import FILE_ONLY, get_logger, setup_logging
from bidsapp.runtime import resolve_device, set_threads


def _is_within(path: Path, parent: Path) -> bool:
    path, parent = path.resolve(), parent.resolve()
    return path == parent or parent in path.parents


def check_paths(config: Config) -> None:
    """Refuse a missing input, and an output or work directory that would write into an input.

    The inputs are BIDS_DIR and every ``-d NAME=PATH`` root: OUTPUT_DIR gets a
    ``dataset_description.json`` and the work directory a cache, and either would turn a valid
    input dataset (raw BIDS, fMRIPrep's derivatives) into an invalid one.
    """
    if not config.bids_dir.is_dir():
        raise NoInputError(f"BIDS_DIR {config.bids_dir} does not exist or is not a directory")
    inputs = {"BIDS_DIR": config.bids_dir,
              **{f"-d {name}": Path(root) for name, root in config.selection.derivatives.items()}}
    for what, root in inputs.items():
        for option, path in (("OUTPUT_DIR", config.output_dir), ("the work directory (-w)",
                                                                  config.work_dir)):
            if _is_within(path, root):
                raise UsageError(f"{option} {path} is {what} or inside it ({root}); choose a "
                                 "directory outside the input datasets")


def start_run(config: Config) -> Path | None:
    """Create OUTPUT_DIR, the work directory and the log, and save the config; return the log.

    Under torchrun only rank 0 writes the log file and the config; other ranks log to stderr.
    """
    ensure_dir(config.output_dir)
    ensure_dir(config.work_dir)
    if env_rank() != 0:
        setup_logging(-1 if config.verbosity == 0 else config.verbosity)
        return None
    logs_dir = ensure_dir(config.output_dir / "logs")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_id = f"{config.analysis_level}-{stamp}_{uuid.uuid4().hex[:8]}"
    log_file = logs_dir / f"roimae-{run_id}.log"
    setup_logging(config.verbosity, log_file)
    atomic_write_text(logs_dir / f"roimae-{run_id}_config.json", config.to_json() + "\n")
    return log_file


def run(config: Config) -> int:
    """Run the analysis level of ``config``; return the exit code (errors are raised)."""
    check_paths(config)
    device = resolve_device(config.device)
    start_run(config)
    set_threads(config.omp_nthreads)
    log = get_logger()
    log.info("roimae %s level on %s (device %s, %d threads)", config.analysis_level,
             config.bids_dir, device, config.omp_nthreads)
    try:
        try:
            if config.analysis_level == "pretrain":
                from bidsapp.pretrain import run_pretrain

                run_pretrain(config, device)
            elif config.analysis_level == "participant":
                from bidsapp.participant import run_participant

                run_participant(config, device)
            else:
                from bidsapp.group import run_group

                run_group(config)
        except Exception as exc:
            interruption = interruption_in(exc)
            if interruption is not None:
                raise interruption from exc
            # DEBUG reaches the log file (not the console, where the CLI prints the error line).
            log.debug("failed: %s: %s", type(exc).__name__, exc, exc_info=True)
            raise
    except KeyboardInterrupt as exc:   # SIGINT, or SIGTERM (bidsapp.errors.Terminated)
        # The log file only: the CLI prints the same line on the console.
        log.error("%s", interruption_message(exc), extra={FILE_ONLY: True})
        raise
    log.info("roimae %s level finished; outputs in %s", config.analysis_level, config.output_dir)
    return 0


#: Settings of the demo chain: small enough for 2 CPU cores in a few minutes.
DEMO_PRETRAIN = ["--preset", "tiny", "--epochs", "12", "--batch-size", "4", "--lr", "3e-3",
                 "--window-frames", "10"]
DEMO_MASKINGS = ("roi", "random")
#: Every readout, beside the fc and covariates baselines.
DEMO_READOUTS = READOUTS
#: Twice the default subsets: the demo's group attribution resolves its planted regions.
DEMO_PARTICIPANT = ["--attribution-subsets", "16"]


def run_demo_chain(bids_dir: Path, out_dir: Path, *, verbosity: int = 0, nprocs: int = 1,
                   n_permutations: int = 200, overwrite: bool = False) -> Path:
    """Pretrain (roi and random), then the participant and group levels on the demo dataset.

    ``overwrite`` replaces models an earlier chain left in ``out_dir`` (else pretraining refuses
    to run over them).
    """
    from bidsapp.cli import build_parser, config_from_args

    common = [str(bids_dir), str(out_dir)] + ["-v"] * verbosity + ["--nprocs", str(nprocs)]
    steps = []
    for masking in DEMO_MASKINGS:
        steps.append([*common, "pretrain", "--masking", masking, *DEMO_PRETRAIN,
                      *(["--overwrite"] if overwrite else [])])
        steps.append([*common, "participant", "--model-desc", masking, *DEMO_PARTICIPANT])
    steps.append([*common, "group", "--target", "diagnosis", "--compare", *DEMO_MASKINGS, "fc",
                  "covariates", "--features", *DEMO_READOUTS, "--covariates", "age", "sex",
                  "--n-permutations", str(n_permutations)])
    for argv in steps:
        run(config_from_args(build_parser().parse_args(argv)))
    return out_dir / "group.html"


def run_demo(args: argparse.Namespace) -> int:
    """``roimae demo OUT_DIR``: write the demo dataset and, with ``--run``, the whole chain."""
    from bidsapp.demo import make_demo_dataset

    setup_logging(args.verbosity)
    out_dir = Path(args.out_dir).expanduser().absolute()
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise UsageError(f"{out_dir} is not empty: choose a new or empty directory for the demo, "
                         "or pass --overwrite to replace files of the same names there")
    bids_dir = out_dir / "bids" if args.run else out_dir
    make_demo_dataset(bids_dir, n_participants=args.participants, n_frames=args.frames,
                      seed=args.seed)
    get_logger().info("demo dataset written to %s", bids_dir)
    if args.run:
        report = run_demo_chain(bids_dir, out_dir / "derivatives", verbosity=args.verbosity,
                                nprocs=min(2, os.cpu_count() or 1), overwrite=args.overwrite)
        print(f"Reports: {report} and {out_dir / 'derivatives'}/sub-*.html")
    return 0
