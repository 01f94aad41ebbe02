"""The parsers of ``roimae`` and ``roimae demo``, and from parsed arguments to a :class:`Config`.

The :class:`~bidsapp.config.Config` owns the defaults and the choices: each option's ``dest`` is the
path of the config field it sets (``pretrain.epochs``), and its default, choices and value type are
read from that field. :func:`config_from_args` nests the parsed values by these paths; the few
options that are not one field each are in :data:`FANOUT` and :data:`CONVERTERS`.

Cheap to import (argparse, pydantic and the config): ``roimae --help`` loads neither torch nor a level.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from bidsapp._version import __version__
from bidsapp.config import (
    DEFAULT_SPACES,
    LEVELS,
    MASKING_NAMES,
    UPSTREAM_FAMILIES,
    Config,
    ModelConfig,
    PreprocessConfig,
)
from bidsapp.errors import ExitCode, UnknownLevelError, UsageError

__all__ = ["LEVELS", "build_demo_parser", "build_import_parser", "build_parser", "config_from_args",
           "default_omp_nthreads", "default_work_dir"]

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


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, once.

    Not for switches, absent values (None), or a help text that already says what the default is.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and action.nargs != 0 and default is not None
                and default is not argparse.SUPPRESS and "default" not in text):
            shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
            text += f" (default: {shown.replace('%', '%%')})"
        return text


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


def config_field(path: str) -> FieldInfo:
    """The :class:`Config` field at ``path`` (``device``, ``pretrain.epochs``)."""
    model: type[BaseModel] = Config
    *sections, name = path.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name]


def _literal_values(annotation: Any) -> tuple | None:
    """The values of the Literal in ``annotation`` (also inside ``X | None`` or ``list[X]``)."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    for arg in get_args(annotation):
        values = _literal_values(arg)
        if values is not None:
            return values
    return None


def _value_type(annotation: Any) -> type | None:
    """``int``, ``float`` or ``Path`` when the field holds one (or ``None``), else None (str)."""
    for candidate in (int, float, Path):
        if annotation is candidate or candidate in get_args(annotation):
            return candidate
    return None


def _option(group: argparse._ActionsContainer, dest: str, *flags: str,
            **kwargs: Any) -> argparse.Action:
    """Add an option that sets the Config field ``dest`` (or an entry of FANOUT / CONVERTERS).

    Unless given, its default is the field's, its choices the field's Literal values and its
    value type the field's (int, float, Path; else str); switches (``action``) take none of these
    but the default.
    """
    field = config_field(FANOUT[dest][0] if dest in FANOUT else dest)
    kwargs.setdefault("default", field.get_default(call_default_factory=True))
    if "action" not in kwargs:
        kwargs.setdefault("choices", _literal_values(field.annotation))
        kwargs.setdefault("type", _value_type(field.annotation))
        if kwargs["choices"] is None:
            kwargs.setdefault("metavar", dest.rpartition(".")[2].upper())
    return group.add_argument(*flags, dest=dest, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``roimae`` command (also read by the Boutiques test)."""
    parser = _Parser(
        prog="roimae",
        description="roimae: ROI-guided masked autoencoder pretraining, embeddings and region "
        "attribution for MNI-space fMRI (a BIDS-App). Use `roimae demo OUT_DIR` for a demo dataset "
        "and `roimae import-model CKPT OUTPUT_DIR --from neurostorm` to start from NeuroSTORM or "
        "SwiFT.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="fMRIPrep derivatives, or a raw BIDS dataset "
                        "with derivatives/fmriprep (or -d fmriprep=PATH)")
    parser.add_argument("output_dir", type=Path, help="where the derivatives are written")
    parser.add_argument("analysis_level", metavar="{" + ",".join(LEVELS) + "}",
                        help="processing stage to run")
    parser.add_argument("--version", action="version", version=f"roimae {__version__}")

    sel = parser.add_argument_group("Selecting input data")
    _option(sel, "selection.participant_label", *_both("participant-label"), nargs="+",
            metavar="LABEL", help="participants to process ('sub-' optional)")
    _option(sel, "selection.session_label", *_both("session-label"), nargs="+", metavar="LABEL",
            help="sessions to process ('ses-' optional)")
    _option(sel, "selection.task_label", *_both("task-label"), "--task-id", nargs="+",
            metavar="LABEL", help="tasks to process ('task-' optional)")
    _option(sel, "selection.space", "--space", help="MNI template space of the BOLD runs "
            f"(default: first available of {', '.join(DEFAULT_SPACES)})")
    _option(sel, "selection.bids_filters", *_both("bids-filter-file"), type=Path, metavar="FILE",
            default=None, help="JSON file of pybids filters, keyed by 'bold' and/or 'mask'")
    _option(sel, "bids_database_dir", *_both("bids-database-dir"), metavar="DIR",
            help="reuse (or create) a pybids index database here")
    _option(sel, "selection.derivatives", "-d", "--derivatives", nargs="+", type=_key_value,
            metavar="NAME=PATH", default=None,
            help="derivative datasets to search, e.g. fmriprep=/data/derivatives/fmriprep")
    _option(sel, "skip_bids_validation", *_both("skip-bids-validation"), action="store_true",
            help="do not run the BIDS validator on raw input")

    gen = parser.add_argument_group("General options")
    _option(gen, "work_dir", "-w", *_both("work-dir"), default=None,
            help="work directory for the preprocessed-data cache and temporary files "
            f"(default: OUTPUT_DIR/{WORK_DIR_NAME})")
    _option(gen, "atlas", "--atlas", help="parcellation image (MNI), with --atlas-labels")
    _option(gen, "atlas_labels", *_both("atlas-labels"),
            help="label table (TSV: index, name[, hemisphere, group])")
    _option(gen, "device", "--device", help="where to run the model")
    _option(gen, "nprocs", "--nprocs", "--n-cpus", "--n_cpus", help="processes for data loading")
    _option(gen, "omp_nthreads", *_both("omp-nthreads"), default=None,
            help="threads per process for PyTorch / BLAS (default: all CPUs / nprocs)")
    _option(gen, "random_seed", *_both("random-seed"),
            help="seed of every random choice (masks, splits, initialisation)")
    _option(gen, "verbosity", "-v", "--verbose", action="count",
            help="more output (-vv also prints tracebacks)")

    pre = parser.add_argument_group("Preprocessing to the model grid")
    _option(pre, "preprocess.window_frames", *_both("window-frames"),
            help="frames per model input window (default: "
            f"{PreprocessConfig.DEFAULT_WINDOW_FRAMES} for pretrain, the model's value for "
            "participant)")
    _option(pre, "preprocess.target_tr", *_both("target-tr"),
            help="resample every run in time to this repetition time (seconds)")

    mod = parser.add_argument_group("Model and masking")
    _option(mod, "model.backbone", "--backbone",
            help="encoder: swin4d (NeuroSTORM's shifted windows) or vit4d (plain ViT on the "
            "visible brain tokens, as MAE); neurostorm and swift: the upstream networks, exactly "
            f"(preset released; default: {ModelConfig.DEFAULT_BACKBONE} for pretrain, the model's "
            "backbone for participant and with --init-from)")
    _option(mod, "model.preset", "--preset",
            help=f"model size (base = NeuroSTORM's sizes; default: {ModelConfig.DEFAULT_PRESET} "
            "for pretrain, the model's preset for participant and with --init-from)")
    _option(mod, "masking.masking", "--masking", help="masking strategy for pretraining")
    _option(mod, "masking.mask_ratio", *_both("mask-ratio"),
            help="fraction of regions (or tokens, see --mask-ratio-unit) to hide")
    _option(mod, "masking.mask_ratio_unit", *_both("mask-ratio-unit"),
            help="what --mask-ratio counts for roi masking")
    _option(mod, "masking.mask_time", *_both("mask-time"),
            help="same mask in every frame (tube) or a new one per frame")

    tr = parser.add_argument_group("Pretrain level")
    _option(tr, "pretrain.epochs", "--epochs", help="passes over the training windows")
    _option(tr, "pretrain.batch_size", *_both("batch-size"), help="windows per training step")
    _option(tr, "pretrain.lr", "--lr", help="peak learning rate (AdamW)")
    _option(tr, "pretrain.weight_decay", *_both("weight-decay"), help="AdamW weight decay")
    _option(tr, "pretrain.warmup_epochs", *_both("warmup-epochs"),
            help="epochs of linear learning-rate warm-up (then cosine decay)")
    _option(tr, "pretrain.clip_grad", *_both("clip-grad"), help="gradient norm clipping")
    _option(tr, "pretrain.val_fraction", *_both("val-fraction"),
            help="fraction of participants held out for the validation loss")
    _option(tr, "pretrain.norm_pix_loss", *_both("norm-pix-loss"), action="store_true",
            help="normalise each token's target voxels before the loss")
    _option(tr, "pretrain.resume", "--resume", action="store_true",
            help="continue from the last checkpoint (refused for another seed, split of "
            "participants or set of input runs)")
    _option(tr, "pretrain.init_from", *_both("init-from"), metavar="MODEL",
            help="continue pretraining from this model (its folder, e.g. "
            "OUTPUT_DIR/models/desc-neurostorm from `roimae import-model`, or its .safetensors): "
            "its backbone, sizes, window length and TR, with this run's --masking")
    _option(tr, "pretrain.torch_compile", *_both("torch-compile"), action="store_true",
            help="compile the training step with torch.compile (on a GPU, or on a CPU over runs "
            "of more than a few thousand steps: the first step compiles, for a minute or more)")
    _option(tr, "pretrain.cpu_bf16", *_both("cpu-bf16"), action="store_true",
            help="on the CPU, train in bfloat16 autocast as on CUDA (attention stays float32); "
            "needs AVX512-BF16 or AMX; steps up to 20%% faster, 22-27%% with --torch-compile")

    par = parser.add_argument_group("Participant level")
    _option(par, "participant.model", "--model",
            help="checkpoint (.safetensors with its .json sidecar); default: the one the "
            "pretrain level wrote in OUTPUT_DIR")
    _option(par, "participant.model_desc", *_both("model-desc"),
            help="which model in OUTPUT_DIR (its masking, e.g. "
            f"{', '.join(MASKING_NAMES[:2])}, or an imported model's desc, e.g. neurostorm)")
    _option(par, "participant.attribution", *_both("no-attribution"), action="store_false",
            help="embeddings only")
    _option(par, "participant.attribution_subsets", *_both("attribution-subsets"),
            help="random region subsets per window for attribution (even: each subset is paired "
            "with its complement; cost K + 1 passes per window, precision ~ sqrt(K x windows))")
    _option(gen, "overwrite", "--overwrite", action="store_true",
            help="participant: redo runs already complete; pretrain: replace the model of this "
            "masking already in OUTPUT_DIR (its checkpoints are deleted); demo: write into a "
            "non-empty OUT_DIR")
    _option(par, "participant.reports", *_both("no-reports"), action="store_false",
            help="skip the HTML reports")

    grp = parser.add_argument_group("Group level")
    _option(grp, "group.target", "--target",
            help="participants.tsv column to classify (e.g. diagnosis)")
    _option(grp, "group.target_map", *_both("target-map"), nargs="+", type=_key_value,
            metavar="VALUE=CLASS", default=None,
            help="recode target values, e.g. 0=control 1=adhd")
    _option(grp, "group.classifier", "--classifier", help="classifier of the group level")
    _option(grp, "group.cv_folds", *_both("cv-folds"), help="cross-validation folds")
    _option(grp, "group.cv_repeats", *_both("cv-repeats"),
            help="repeats of the cross-validation, each with new folds")
    _option(grp, "group.cv_groups", *_both("cv-groups"), metavar="COLUMN",
            help="participants.tsv column whose groups stay in one fold (e.g. site)")
    _option(grp, "group.n_permutations", *_both("n-permutations"),
            help="label permutations for the p-value (0: no p-value)")
    _option(grp, "group.compare", "--compare", nargs="+", metavar="SET",
            help="score these feature sets on identical folds: models by masking (e.g. "
            f"{' '.join(MASKING_NAMES[:2])}) or desc (e.g. neurostorm, imported) and the "
            "baselines fc (functional connectivity), "
            "tangent (tangent-space FC) and covariates (default: every model found, fc, "
            "tangent, and covariates when --covariates is given)")
    _option(grp, "group.features", "--features", nargs="+",
            help="readouts of each model: connectivity of its region features, region "
            "embeddings, within-region dispersion (subregion) and its model-free reference "
            "(inputsubregion), or the run embedding")
    _option(grp, "group.covariates", "--covariates", nargs="+", metavar="COLUMN",
            help="participants.tsv columns of the covariates baseline (e.g. age sex)")
    return parser


def build_demo_parser() -> argparse.ArgumentParser:
    """Parser of ``roimae demo OUT_DIR``."""
    parser = _Parser(prog="roimae demo", description="Write the synthetic demo dataset "
                     "(fMRIPrep-style derivatives with planted regional effects).",
                     formatter_class=_HelpFormatter)
    parser.add_argument("out_dir", type=Path, help="directory of the demo (created if needed)")
    parser.add_argument("--participants", type=int, default=24, help="number of participants")
    parser.add_argument("--frames", type=int, default=40, help="frames per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--run", action="store_true",
                        help="then run pretrain (roi, random), participant and group on it")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty OUT_DIR: files of the same names (the demo "
                        "dataset, an earlier demo's models and outputs) are replaced")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0,
                        help="more output (-vv also prints tracebacks)")
    return parser


def build_import_parser() -> argparse.ArgumentParser:
    """Parser of ``roimae import-model CKPT OUTPUT_DIR --from {neurostorm,swift}``."""
    parser = _Parser(prog="roimae import-model", description="Import a pretrained NeuroSTORM or "
                     "SwiFT checkpoint (PyTorch Lightning .ckpt, read as plain data: nothing in it "
                     "runs) as the roimae model OUTPUT_DIR/models/desc-NAME, which every level "
                     "takes with --model-desc NAME.", formatter_class=_HelpFormatter)
    parser.add_argument("checkpoint", type=Path, metavar="CKPT",
                        help="the upstream checkpoint, e.g. pt_fmrifound_mae_ratio0.5.ckpt")
    parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR",
                        help="the roimae output directory the model goes into")
    parser.add_argument("--from", dest="family", required=True, choices=UPSTREAM_FAMILIES,
                        help="what the checkpoint holds")
    parser.add_argument("--desc", metavar="NAME", default=None,
                        help="the model's desc label (letters and digits; default: the family)")
    parser.add_argument("--atlas", type=Path, default=None,
                        help="parcellation image (MNI) for the model's region readouts and "
                        "attribution, with --atlas-labels (default: AAL3)")
    parser.add_argument("--atlas-labels", "--atlas_labels", dest="atlas_labels", type=Path,
                        default=None, help="label table of --atlas")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model folder of that name")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0,
                        help="more output (-vv also prints tracebacks)")
    return parser


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


#: Options that set several Config fields (dest -> field paths).
FANOUT: dict[str, tuple[str, ...]] = {"overwrite": ("pretrain.overwrite", "participant.overwrite")}

#: Options whose parsed value is converted before it reaches the Config (dest -> converter).
CONVERTERS = {
    "selection.bids_filters": _read_filter_file,   # the file's path -> its filters
    "selection.derivatives": dict,                  # NAME=PATH pairs -> {NAME: PATH}
    "group.target_map": dict,                       # VALUE=CLASS pairs -> {VALUE: CLASS}
}


def config_from_args(args: argparse.Namespace) -> Config:
    """Turn parsed arguments into a validated :class:`Config` (raises UsageError).

    Every ``dest`` is a Config field path (or a FANOUT entry); an option left at None takes the
    field's default. Paths are made absolute, and the work directory and the threads per process
    get their defaults, which depend on other options.
    """
    if args.analysis_level not in LEVELS:
        raise UnknownLevelError(
            f"unknown analysis level {args.analysis_level!r}; choose one of {', '.join(LEVELS)}"
        )
    values = {dest: value for dest, value in vars(args).items() if value is not None}
    for dest, paths in FANOUT.items():
        if dest in values:
            value = values.pop(dest)
            values.update(dict.fromkeys(paths, value))
    for dest, convert in CONVERTERS.items():
        if dest in values:
            values[dest] = convert(values[dest])
    output_dir = args.output_dir.expanduser().absolute()
    values["bids_dir"] = args.bids_dir.expanduser().absolute()
    values["output_dir"] = output_dir
    values["work_dir"] = (args.work_dir or default_work_dir(output_dir)).expanduser().absolute()
    # Only an absent option means "all CPUs"; --omp-nthreads 0 is refused by the Config.
    values.setdefault("omp_nthreads", default_omp_nthreads(args.nprocs))
    nested: dict[str, Any] = {}
    for path, value in values.items():
        *sections, name = path.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value
    try:
        return Config(**nested)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise UsageError(f"{where}: {message}" if where else message) from exc
