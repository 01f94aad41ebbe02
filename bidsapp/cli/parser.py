"""The parsers of ``roimae`` and ``roimae demo``, and from parsed arguments to a :class:`Config`.

Cheap to import (argparse, pydantic and the config only): ``roimae --help`` loads nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from bidsapp import __version__
from bidsapp.config import READOUTS, Config
from bidsapp.errors import ExitCode, UnknownLevelError, UsageError

LEVELS = ("pretrain", "participant", "group")
#: The work directory's name in OUTPUT_DIR when ``-w`` is not given.
WORK_DIR_NAME = ".roimae-work"


def default_work_dir(output_dir: Path) -> Path:
    """The work directory when ``-w`` is not given."""
    return output_dir / WORK_DIR_NAME


def default_omp_nthreads(nprocs: int) -> int:
    """Threads per process when ``--omp-nthreads`` is not given: the usable CPUs / ``nprocs``."""
    # The CPUs this process may use (a container's or Slurm job's share), not the whole host's.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // max(1, nprocs))


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 64 (EX_USAGE) with one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {message}\n")


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if not key or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def _both(name: str) -> list[str]:
    """``--participant-label`` and its fMRIPrep spelling ``--participant_label``."""
    spellings = [f"--{name}"]
    if "-" in name:
        spellings.append(f"--{name.replace('-', '_')}")
    return spellings


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``roimae`` command (also read by the Boutiques test)."""
    parser = _Parser(
        prog="roimae",
        description="roimae: ROI-guided masked autoencoder pretraining, embeddings and region "
        "attribution for MNI-space fMRI (a BIDS-App). Use `roimae demo OUT_DIR` for a demo dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="fMRIPrep derivatives, or a raw BIDS dataset "
                        "with derivatives/fmriprep (or -d fmriprep=PATH)")
    parser.add_argument("output_dir", type=Path, help="where the derivatives are written")
    parser.add_argument("analysis_level", metavar="{pretrain,participant,group}",
                        help="processing stage to run")
    parser.add_argument("--version", action="version", version=f"roimae {__version__}")

    sel = parser.add_argument_group("Selecting input data")
    sel.add_argument(*_both("participant-label"), dest="participant_label", nargs="+",
                     metavar="LABEL", help="participants to process ('sub-' optional)")
    sel.add_argument(*_both("session-label"), dest="session_label", nargs="+", metavar="LABEL",
                     help="sessions to process ('ses-' optional)")
    sel.add_argument(*_both("task-label"), "--task-id", dest="task_label", nargs="+",
                     metavar="LABEL", help="tasks to process ('task-' optional)")
    sel.add_argument("--space", default=None, help="MNI template space of the BOLD runs "
                     "(default: first available of MNI152NLin2009cAsym, MNI152NLin6Asym)")
    sel.add_argument(*_both("bids-filter-file"), dest="bids_filter_file", type=Path,
                     metavar="FILE", help="JSON file of pybids filters, keyed by 'bold' and/or 'mask'")
    sel.add_argument(*_both("bids-database-dir"), dest="bids_database_dir", type=Path,
                     metavar="DIR", help="reuse (or create) a pybids index database here")
    sel.add_argument("-d", "--derivatives", nargs="+", type=_key_value, metavar="NAME=PATH",
                     help="derivative datasets to search, e.g. fmriprep=/data/derivatives/fmriprep")
    sel.add_argument(*_both("skip-bids-validation"), dest="skip_bids_validation",
                     action="store_true", help="do not run the BIDS validator on raw input")

    gen = parser.add_argument_group("General options")
    gen.add_argument("-w", *_both("work-dir"), dest="work_dir", type=Path, default=None,
                     help="work directory for the preprocessed-data cache and temporary files "
                     "(default: OUTPUT_DIR/.roimae-work)")
    gen.add_argument("--atlas", type=Path, help="parcellation image (MNI), with --atlas-labels")
    gen.add_argument(*_both("atlas-labels"), dest="atlas_labels", type=Path,
                     help="label table (TSV: index, name[, hemisphere, group])")
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where to run the model")
    gen.add_argument("--nprocs", "--n-cpus", "--n_cpus", dest="nprocs", type=int, default=1,
                     help="processes for data loading")
    gen.add_argument(*_both("omp-nthreads"), dest="omp_nthreads", type=int, default=None,
                     help="threads per process for PyTorch / BLAS (default: all CPUs / nprocs)")
    gen.add_argument(*_both("random-seed"), dest="random_seed", type=int, default=0,
                     help="seed of every random choice (masks, splits, initialisation)")
    gen.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0,
                     help="more output (-vv also prints tracebacks)")

    pre = parser.add_argument_group("Preprocessing to the model grid")
    pre.add_argument(*_both("window-frames"), dest="window_frames", type=int, default=None,
                     help="frames per model input window (default: 20 for pretrain, the "
                     "model's value for participant)")
    pre.add_argument(*_both("target-tr"), dest="target_tr", type=float, default=None,
                     help="resample every run in time to this repetition time (seconds)")

    mod = parser.add_argument_group("Model and masking")
    mod.add_argument("--backbone", choices=("swin4d", "vit4d"), default=None,
                     help="encoder: swin4d (NeuroSTORM's shifted windows) or vit4d (plain ViT on "
                     "the visible brain tokens, as MAE; default: swin4d for pretrain, the model's "
                     "backbone for participant)")
    mod.add_argument("--preset", choices=("tiny", "small", "base"), default=None,
                     help="model size (base = NeuroSTORM; default: tiny for pretrain, the "
                     "model's preset for participant)")
    mod.add_argument("--masking", choices=("roi", "random", "brain-random", "roi-voxel"),
                     default="roi", help="masking strategy for pretraining")
    mod.add_argument(*_both("mask-ratio"), dest="mask_ratio", type=float, default=0.5,
                     help="fraction of regions (or tokens, see --mask-ratio-unit) to hide")
    mod.add_argument(*_both("mask-ratio-unit"), dest="mask_ratio_unit",
                     choices=("regions", "tokens"), default="regions",
                     help="what --mask-ratio counts for roi masking")
    mod.add_argument(*_both("mask-time"), dest="mask_time", choices=("tube", "random"),
                     default="tube", help="same mask in every frame (tube) or a new one per frame")

    tr = parser.add_argument_group("Pretrain level")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument(*_both("batch-size"), dest="batch_size", type=int, default=2)
    tr.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    tr.add_argument(*_both("weight-decay"), dest="weight_decay", type=float, default=0.05)
    tr.add_argument(*_both("warmup-epochs"), dest="warmup_epochs", type=float, default=1.0)
    tr.add_argument(*_both("clip-grad"), dest="clip_grad", type=float, default=1.0)
    tr.add_argument(*_both("val-fraction"), dest="val_fraction", type=float, default=0.2,
                    help="fraction of participants held out for the validation loss")
    tr.add_argument(*_both("norm-pix-loss"), dest="norm_pix_loss", action="store_true",
                    help="normalise each token's target voxels before the loss")
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint "
                    "(refused for another seed, split of participants or set of input runs)")
    tr.add_argument(*_both("torch-compile"), dest="torch_compile", action="store_true",
                    help="compile the training step with torch.compile (pays off on CUDA over "
                    "long runs; the first steps are slower while it compiles)")

    par = parser.add_argument_group("Participant level")
    par.add_argument("--model", type=Path, help="checkpoint (.safetensors with its .json sidecar); "
                     "default: the one the pretrain level wrote in OUTPUT_DIR")
    par.add_argument(*_both("model-desc"), dest="model_desc",
                     help="which pretrained model in OUTPUT_DIR (its masking, e.g. roi, random)")
    par.add_argument(*_both("no-attribution"), dest="attribution", action="store_false",
                     help="embeddings only")
    par.add_argument(*_both("attribution-subsets"), dest="attribution_subsets", type=int,
                     default=6, help="random region subsets per window for attribution (even: each "
                     "subset is paired with its complement; cost K + 1 passes per window, "
                     "precision ~ sqrt(K x windows))")
    gen.add_argument("--overwrite", action="store_true", help="participant: redo runs already "
                     "complete; pretrain: replace the model of this masking already in OUTPUT_DIR "
                     "(its checkpoints are deleted); demo: write into a non-empty OUT_DIR")
    par.add_argument(*_both("no-reports"), dest="reports", action="store_false",
                     help="skip the HTML reports")

    grp = parser.add_argument_group("Group level")
    grp.add_argument("--target", help="participants.tsv column to classify (e.g. diagnosis)")
    grp.add_argument(*_both("target-map"), dest="target_map", nargs="+", type=_key_value,
                     metavar="VALUE=CLASS", help="recode target values, e.g. 0=control 1=adhd")
    grp.add_argument("--classifier", choices=("logreg", "svm", "mlp"), default="logreg")
    grp.add_argument(*_both("cv-folds"), dest="cv_folds", type=int, default=5)
    grp.add_argument(*_both("cv-repeats"), dest="cv_repeats", type=int, default=5)
    grp.add_argument(*_both("cv-groups"), dest="cv_groups", metavar="COLUMN",
                     help="participants.tsv column whose groups stay in one fold (e.g. site)")
    grp.add_argument(*_both("n-permutations"), dest="n_permutations", type=int, default=1000)
    grp.add_argument("--compare", nargs="+", metavar="SET",
                     help="score these feature sets on identical folds: model maskings (e.g. roi "
                     "random) and the baselines fc (functional connectivity) and covariates "
                     "(default: every model found, fc, and covariates when --covariates is given)")
    grp.add_argument("--features", nargs="+", choices=READOUTS, default=[READOUTS[0]],
                     help="readouts of each model: connectivity of its region features, region "
                     "embeddings, or the run embedding")
    grp.add_argument("--covariates", nargs="+", metavar="COLUMN",
                     help="participants.tsv columns of the covariates baseline (e.g. age sex)")
    return parser


def build_demo_parser() -> argparse.ArgumentParser:
    """Parser of ``roimae demo OUT_DIR``."""
    parser = _Parser(prog="roimae demo", description="Write the synthetic demo dataset "
                     "(fMRIPrep-style derivatives with planted regional effects).",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--participants", type=int, default=24)
    parser.add_argument("--frames", type=int, default=40, help="frames per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", action="store_true",
                        help="then run pretrain (roi, random), participant and group on it")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty OUT_DIR: files of the same names (the demo "
                        "dataset, an earlier demo's models and outputs) are replaced")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Turn parsed arguments into a validated :class:`Config` (raises UsageError)."""
    if args.analysis_level not in LEVELS:
        raise UnknownLevelError(
            f"unknown analysis level {args.analysis_level!r}; choose one of {', '.join(LEVELS)}"
        )
    bids_filters: dict = {}
    if args.bids_filter_file is not None:
        bids_filters = _read_filter_file(args.bids_filter_file)
    output_dir = args.output_dir.expanduser().absolute()
    work_dir = (args.work_dir or default_work_dir(output_dir)).expanduser()
    # Only an absent option means "all CPUs"; --omp-nthreads 0 is refused by the Config.
    omp = (args.omp_nthreads if args.omp_nthreads is not None
           else default_omp_nthreads(args.nprocs))
    try:
        return Config(
            bids_dir=args.bids_dir.expanduser().absolute(),
            output_dir=output_dir,
            analysis_level=args.analysis_level,
            work_dir=work_dir.absolute(),
            bids_database_dir=args.bids_database_dir,
            skip_bids_validation=args.skip_bids_validation,
            atlas=args.atlas,
            atlas_labels=args.atlas_labels,
            device=args.device,
            nprocs=args.nprocs,
            omp_nthreads=omp,
            random_seed=args.random_seed,
            verbosity=args.verbosity,
            selection={
                "participant_label": args.participant_label,
                "session_label": args.session_label,
                "task_label": args.task_label,
                "space": args.space,
                "bids_filters": bids_filters,
                "derivatives": dict(args.derivatives or []),
            },
            preprocess={"window_frames": args.window_frames, "target_tr": args.target_tr},
            model={"backbone": args.backbone, "preset": args.preset},
            masking={
                "masking": args.masking,
                "mask_ratio": args.mask_ratio,
                "mask_ratio_unit": args.mask_ratio_unit,
                "mask_time": args.mask_time,
            },
            pretrain={
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "weight_decay": args.weight_decay,
                "warmup_epochs": args.warmup_epochs,
                "clip_grad": args.clip_grad,
                "val_fraction": args.val_fraction,
                "norm_pix_loss": args.norm_pix_loss,
                "resume": args.resume,
                "overwrite": args.overwrite,
                "torch_compile": args.torch_compile,
            },
            participant={
                "model": args.model,
                "model_desc": args.model_desc,
                "attribution": args.attribution,
                "attribution_subsets": args.attribution_subsets,
                "overwrite": args.overwrite,
                "reports": args.reports,
            },
            group={
                "target": args.target,
                "target_map": dict(args.target_map or []),
                "classifier": args.classifier,
                "cv_folds": args.cv_folds,
                "cv_repeats": args.cv_repeats,
                "cv_groups": args.cv_groups,
                "n_permutations": args.n_permutations,
                "compare": args.compare,
                "features": args.features,
                "covariates": args.covariates,
            },
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise UsageError(f"{where}: {message}" if where else message) from exc


def _read_filter_file(path: Path) -> dict:
    try:
        filters = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(f"--bids-filter-file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"--bids-filter-file {path} is not valid UTF-8 JSON: {reason}") from exc
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(
            f"--bids-filter-file {path} must map query names ('bold', 'mask') to objects"
        )
    return filters
