"""``roimae demo OUT_DIR [--run]``: write the demo dataset and, with ``--run``, run every level on it.

The chain builds each level's :class:`~bidsapp.config.Config` directly (no command line is
re-parsed) and hands it to :func:`bidsapp.levels.run`, as ``roimae`` does after parsing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from bidsapp.caches import prepare_caches
from bidsapp.cli.parser import default_omp_nthreads, default_work_dir
from bidsapp.config import BASELINES, READOUTS, Config
from bidsapp.demo import make_demo_dataset
from bidsapp.errors import UsageError
from bidsapp.logs import get_logger, setup_logging
from bidsapp.outputs import GroupOutputs

__all__ = ["DEMO_MASKINGS", "DEMO_READOUTS", "demo_configs", "run_demo", "run_demo_chain"]

#: The maskings pretrained, then analysed at the participant level, by the demo chain.
DEMO_MASKINGS = ("roi", "random")
#: Every readout, beside the fc, tangent and covariates baselines.
DEMO_READOUTS = READOUTS
#: Config sections of the demo's pretrain steps: small enough for 2 CPU cores in a few minutes.
DEMO_PRETRAIN: dict[str, dict[str, Any]] = {
    "model": {"preset": "tiny"},
    "preprocess": {"window_frames": 10},
    "pretrain": {"epochs": 12, "batch_size": 4, "lr": 3e-3},
}
#: The demo group level's target.
DEMO_TARGET = "diagnosis"


def demo_configs(bids_dir: Path, out_dir: Path, *, verbosity: int = 0, nprocs: int = 1,
                 n_permutations: int = 200, overwrite: bool = False) -> list[Config]:
    """The configs of the demo chain, in order: pretrain and participant per masking, then group.

    Each is the config of the ``roimae`` command line that runs this step (default work
    directory and threads).
    """
    output_dir = out_dir.expanduser().absolute()
    common: dict[str, Any] = {
        "bids_dir": bids_dir.expanduser().absolute(),
        "output_dir": output_dir,
        "work_dir": default_work_dir(output_dir),
        "verbosity": verbosity,
        "nprocs": nprocs,
        "omp_nthreads": default_omp_nthreads(nprocs),
    }
    configs = []
    for masking in DEMO_MASKINGS:
        # --overwrite sets both sections, as on the command line.
        configs.append(Config(**common, analysis_level="pretrain", **{
            **DEMO_PRETRAIN, "masking": {"masking": masking},
            "pretrain": {**DEMO_PRETRAIN["pretrain"], "overwrite": overwrite},
            "participant": {"overwrite": overwrite},
        }))
        configs.append(Config(
            **common, analysis_level="participant",
            participant={"model_desc": masking},
        ))
    configs.append(Config(**common, analysis_level="group", group={
        "target": DEMO_TARGET, "compare": [*DEMO_MASKINGS, *BASELINES],
        "features": list(DEMO_READOUTS), "covariates": ["age", "sex"],
        "n_permutations": n_permutations,
    }))
    return configs


def run_demo_chain(bids_dir: Path, out_dir: Path, *, verbosity: int = 0, nprocs: int = 1,
                   n_permutations: int = 200, overwrite: bool = False) -> Path:
    """Pretrain (roi and random), then the participant and group levels on the demo dataset.

    ``overwrite`` replaces models an earlier chain left in ``out_dir`` (else pretraining refuses
    to run over them). Returns the group report.
    """
    # Imported here, after run_demo's prepare_caches: bidsapp.levels imports matplotlib.
    from bidsapp.levels import run

    for config in demo_configs(bids_dir, out_dir, verbosity=verbosity, nprocs=nprocs,
                               n_permutations=n_permutations, overwrite=overwrite):
        run(config)
    return GroupOutputs(out_dir.expanduser().absolute(), DEMO_TARGET).report


def run_demo(args: argparse.Namespace) -> int:
    """``roimae demo OUT_DIR``: write the demo dataset and, with ``--run``, the whole chain."""
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
        prepare_caches(default_work_dir(out_dir / "derivatives"))
        report = run_demo_chain(bids_dir, out_dir / "derivatives", verbosity=args.verbosity,
                                nprocs=min(2, os.cpu_count() or 1), overwrite=args.overwrite)
        print(f"Reports: {report} and {out_dir / 'derivatives'}/sub-*.html")
    return 0
