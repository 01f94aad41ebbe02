"""The ``pretrain`` level: ROI-guided (or random) masked-autoencoder pretraining over the dataset.

Outputs, all under ``OUTPUT_DIR/models/desc-<masking>/`` so that models pretrained with different maskings
sit side by side:

- ``epoch-NNN.safetensors`` + ``epoch-NNN.json`` + ``epoch-NNN_optim.safetensors``: the checkpoint of each
  epoch (the last two are kept); ``--resume`` continues from the newest complete one;
- ``model.safetensors`` + ``model.json``: the final model, read by the participant level;
- ``model.md``: its model card (:mod:`bidsapp.model_card`; the same facts in ``model.json``);
- ``training_log.tsv`` (one row per epoch) and ``loss_curve.png``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bidsapp import model_card
from bidsapp._version import __version__
from bidsapp.atlas import Atlas, load_atlas
from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.bids.layout import InputDataset, discover_runs
from bidsapp.bids.validation import validate_input
from bidsapp.cache import CachedRun, PreprocessParams
from bidsapp.checkpoint import (
    FORMAT,
    CheckpointMeta,
    latest_checkpoint,
    load_optimizer_state,
    load_weights,
    prepare_model_dir,
    prune_checkpoints,
    read_metadata,
    save_checkpoint,
)
from bidsapp.config import Config, masking_desc
from bidsapp.data import build_region_grid, prepare_runs, split_participants
from bidsapp.distributed import DistributedContext
from bidsapp.errors import BadDataError, TrainingDivergedError, UsageError
from bidsapp.logs import get_logger
from bidsapp.model.factory import build_model, describe_model
from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.masking import build_masking
from bidsapp.model.presets import BACKBONE_PRESETS, UPSTREAM_BACKBONES, ModelPreset
from bidsapp.model.upstream import NEUROSTORM_RELEASED
from bidsapp.origin import Origin, read_origin
from bidsapp.outputs import (
    EPOCH_CHECKPOINT,
    MODEL_SIDECAR,
    MODEL_WEIGHTS,
    PRETRAIN_BIDSIGNORE,
    model_dir,
)
from bidsapp.reports import plot_loss_curve
from bidsapp.runtime import seed_everything
from bidsapp.training import EpochMetrics, Trainer, TrainingHistory, TrainingSettings
from bidsapp.windows import WindowDataset

log = get_logger("pretrain")

KEEP_CHECKPOINTS = 2
#: Sidecar entries a checkpoint must share with the run that resumes it, and their names in the
#: error: continuing with another seed, split or input set would silently mix two trainings.
RESUME_MUST_MATCH = {"preset": "preset", "masking": "masking", "atlas": "atlas",
                     "window_frames": "window_frames", "backbone": "backbone",
                     "random_seed": "--random-seed",
                     "split": "split of participants into training and held-out sets",
                     "data": "set of input runs (another selection, or changed files)",
                     "init_from": "--init-from model"}


def pretrain_preset(config: Config, origin: Origin | None = None) -> ModelPreset:
    """The preset of ``--backbone`` and ``--preset`` (or their defaults), or the ``--init-from`` model's.

    Raises
    ------
    UsageError
        A preset the backbone does not have, or swift, which has no decoder to pretrain (64).
    """
    if origin is not None:
        return origin.preset
    backbone = config.model.backbone or config.model.DEFAULT_BACKBONE
    presets = BACKBONE_PRESETS[backbone]
    default = config.model.DEFAULT_PRESET if config.model.DEFAULT_PRESET in presets else next(iter(presets))
    name = config.model.preset or default
    if name not in presets:
        raise UsageError(f"--preset {name}: the {backbone} backbone has the preset(s) "
                         f"{', '.join(presets)}")
    if backbone == "swift":
        raise UsageError("--backbone swift: SwiFT's encoder has no decoder and cannot be pretrained "
                         "by masked reconstruction; import its checkpoint (roimae import-model) and "
                         "use it at the participant level")
    return presets[name]


def window_frames(config: Config, origin: Origin | None = None) -> int:
    """``--window-frames``, the ``--init-from`` model's, or the default for pretraining."""
    if origin is not None:
        return origin.meta.window_frames
    return config.preprocess.window_frames or config.preprocess.DEFAULT_WINDOW_FRAMES


def target_tr(config: Config, origin: Origin | None = None) -> float | None:
    """``--target-tr``, else the ``--init-from`` model's TR (``None``: runs keep their own)."""
    return config.preprocess.target_tr if origin is None else origin.target_tr(config)


def model_metadata(config: Config, atlas: Atlas, runs: list[CachedRun],
                   split: dict[str, list[str]], model: MaskedAutoencoder,
                   origin: Origin | None = None) -> CheckpointMeta:
    """What a checkpoint says about itself: enough to refuse a mismatched config later.

    Its ``epoch`` is 0; each checkpoint saved is a copy with its own epoch and metrics.
    """
    preset = model.preset
    extra: dict[str, Any] = {}
    if preset.backbone in UPSTREAM_BACKBONES:   # the exact network, and an import's provenance
        upstream = origin.meta.upstream if origin is not None else None
        extra["upstream"] = (upstream.model_dump() if upstream is not None else
                             {"family": preset.backbone, "config": model.net.config.describe()})
    if origin is not None:
        extra["init_from"] = origin.info()
    described = (describe_model(preset) if origin is None else
                 {**preset.describe(), "n_parameters": sum(p.numel() for p in model.parameters())})
    return CheckpointMeta.model_validate({
        "format": FORMAT,
        "epoch": 0,
        "roimae_version": __version__,
        "backbone": preset.backbone,
        "preset": described,
        "masking": config.masking.model_dump(),
        "norm_pix_loss": config.pretrain.norm_pix_loss,
        "atlas": {"name": atlas.name, "sha256": atlas.sha256(), "n_regions": len(atlas.regions)},
        "grid": {"cube_shape": [96, 96, 96], "space": "MNI152 2 mm (91x109x91) crop/pad to 96^3",
                 "downsample": preset.downsample, "patch_size": preset.patch_size},
        "window_frames": window_frames(config, origin),
        "target_tr": target_tr(config, origin),
        "random_seed": config.random_seed,
        "training": config.pretrain.model_dump(exclude={"resume", "overwrite", "torch_compile",
                                                          "init_from"}),
        "data": [{"source": r.manifest["source"], "sha256": r.manifest["source_sha256"],
                  "n_windows": r.n_windows} for r in runs],
        "split": split,
        **extra,
    })


def training_settings(config: Config) -> TrainingSettings:
    """The :class:`~bidsapp.training.Trainer` settings of ``config``."""
    train = config.pretrain
    # One process loads and trains; the other --nprocs load data.
    return TrainingSettings(seed=config.random_seed, epochs=train.epochs,
                            batch_size=train.batch_size, lr=train.lr,
                            weight_decay=train.weight_decay, warmup_epochs=train.warmup_epochs,
                            clip_grad=train.clip_grad, num_workers=max(0, config.nprocs - 1),
                            compile_model=train.torch_compile, cpu_bf16=train.cpu_bf16)


def _windows(runs: list[CachedRun], subjects_of_runs: list[str],
             subjects: set[str]) -> list[tuple[int, int]]:
    return [(i, w) for i, (run, sub) in enumerate(zip(runs, subjects_of_runs, strict=True))
            if sub in subjects for w in range(run.n_windows)]


def check_model_dir(config: Config, directory: Path) -> None:
    """Refuse to pretrain over a model already in ``directory`` unless told what to do with it.

    A complete model (``model.json``) or checkpoint (``epoch-*.json``) is continued with
    ``--resume`` or replaced with ``--overwrite``; anything else is a usage error (64), never a
    silent overwrite of hours of training.
    """
    resume, overwrite = config.pretrain.resume, config.pretrain.overwrite
    if resume and overwrite:
        raise UsageError("--resume continues the model in OUTPUT_DIR and --overwrite replaces it: "
                         "give one of them")
    if overwrite or not directory.is_dir():
        return
    model = directory / MODEL_SIDECAR
    checkpoint = latest_checkpoint(directory)
    if resume:
        if checkpoint is None and model.is_file():
            raise UsageError(f"--resume: {directory} holds a model but no checkpoint to continue "
                             "from; pass --overwrite to train a new one in its place")
        return
    held = [p.name for p in (model, checkpoint.with_suffix(".json") if checkpoint else None)
            if p is not None and p.is_file()]
    if held:
        raise UsageError(f"{directory} already holds a pretrained model ({', '.join(held)}); pass "
                         "--resume to continue it, --overwrite to replace it, or choose another "
                         "OUTPUT_DIR")


def run_pretrain(config: Config, device: torch.device) -> Path:
    """Pretrain one model; return the path of the final ``model.safetensors``."""
    ctx = DistributedContext.setup(device)
    try:
        return _pretrain(config, ctx)
    finally:
        ctx.shutdown()


def _pretrain(config: Config, ctx: DistributedContext) -> Path:
    started = time.perf_counter()
    origin = None if config.pretrain.init_from is None else read_origin(config.pretrain.init_from,
                                                                          config)
    preset = pretrain_preset(config, origin)
    frames = window_frames(config, origin)
    _check_frames(preset, frames, fresh=origin is None)
    out_dir = model_dir(config.output_dir, masking_desc(config.masking.masking))
    if origin is not None and origin.weights.parent.resolve() == out_dir.resolve():
        raise UsageError(f"--init-from {origin.weights} is in {out_dir}, the folder this run writes "
                         "(and clears); copy the model elsewhere or choose another OUTPUT_DIR")
    check_model_dir(config, out_dir)
    atlas = load_atlas(config.atlas, config.atlas_labels)
    data = load_training_data(config, ctx, PreprocessParams(
        window_frames=frames, target_tr=target_tr(config, origin), downsample=preset.downsample))
    trainer = _build_trainer(config, ctx, preset, atlas, data, origin)
    meta = model_metadata(config, atlas, data.runs, data.split, trainer.model, origin)
    start_epoch, history = 1, TrainingHistory()
    if config.pretrain.resume:
        start_epoch, history = _resume(out_dir, trainer, meta)
    if ctx.is_main:
        _prepare_outputs(config, out_dir, data.dataset, fresh=start_epoch == 1)
    title = f"{config.masking.masking} masking, {preset.backbone} {preset.name} preset"
    if origin is not None:
        title += f", from {origin.meta.desc or origin.weights.parent.name}"
        log.info("continuing from %s (%s %s)", origin.weights, origin.meta.backbone,
                 origin.preset.name)
    if start_epoch <= config.pretrain.epochs:
        _fit(config, trainer, start_epoch, out_dir,
             _epoch_saver(config, trainer, out_dir, meta, history, title))
    else:
        log.info("all %d epochs are already done in %s", config.pretrain.epochs, out_dir)
    final = out_dir / MODEL_WEIGHTS
    if ctx.is_main:
        _write_model(config, trainer, final, meta, history, data,
                     wall_seconds=time.perf_counter() - started)
    return final


@dataclass(frozen=True)
class TrainingData:
    """The runs a pretraining reads, and its split of participants into training and held-out.

    Attributes
    ----------
    dataset : InputDataset
        The selected input runs.
    runs : list of CachedRun
        Their preprocessed caches, in the same order.
    split : dict
        ``{"train": [participants], "val": [participants]}``, as written in the sidecars.
    train_windows, val_windows : list of (int, int)
        ``(run index, window index)`` of each training and held-out window.
    """

    dataset: InputDataset
    runs: list[CachedRun]
    split: dict[str, list[str]]
    train_windows: list[tuple[int, int]]
    val_windows: list[tuple[int, int]]


def _check_frames(preset: ModelPreset, frames: int, fresh: bool) -> None:
    """Refuse (64) windows the backbone cannot read.

    Not whole tubelets, or not the frames of a fresh upstream network's time embeddings (an
    ``--init-from`` model's are its sidecar's, checked by its schema).
    """
    if frames % preset.tubelet:
        raise UsageError(f"the {preset.backbone} {preset.name} preset reads tokens of {preset.tubelet} "
                         f"frames: --window-frames {frames} is not a multiple of it")
    if fresh and preset.backbone in UPSTREAM_BACKBONES:
        released = NEUROSTORM_RELEASED.img_size[3]
        if frames != released:
            raise UsageError(f"the {preset.backbone} network reads {released}-frame windows (its "
                             f"time embeddings): --window-frames {frames} was given")


def load_training_data(config: Config, ctx: DistributedContext,
                       params: PreprocessParams) -> TrainingData:
    """Find, validate and preprocess the input runs; split them by participant.

    Runs are cached as ``params`` say (the model's window, TR and working resolution).

    Raises
    ------
    BadDataError
        No run is long enough for one window (exit 65).
    """
    dataset: InputDataset = discover_runs(config)
    if ctx.is_main:
        validate_input(config, dataset)
    runs = prepare_runs(config, dataset.runs, params)
    subjects = [run.subject for run in dataset.runs]
    train_subjects, val_subjects = split_participants(subjects, config.pretrain.val_fraction,
                                                      config.random_seed)
    train_idx = _windows(runs, subjects, set(train_subjects))
    val_idx = _windows(runs, subjects, set(val_subjects))
    if not train_idx:
        raise BadDataError("no training windows: every run is shorter than --window-frames "
                           f"{params.window_frames}")
    log.info("%d runs, %d training windows (%d participants), %d held-out windows (%d)",
             len(runs), len(train_idx), len(train_subjects), len(val_idx), len(val_subjects))
    return TrainingData(dataset, runs, {"train": train_subjects, "val": val_subjects},
                        train_idx, val_idx)


def _build_trainer(config: Config, ctx: DistributedContext, preset: ModelPreset, atlas: Atlas,
                   data: TrainingData, origin: Origin | None = None) -> Trainer:
    """A fresh model (or the ``--init-from`` model) and its trainer (the model is ``trainer.model``)."""
    region_grid = build_region_grid(atlas, preset)
    masking = build_masking(config.masking.masking, region_grid.to(ctx.device),
                            config.masking.mask_ratio, unit=config.masking.mask_ratio_unit,
                            time=config.masking.mask_time)
    # Seeded just before the model: its initial weights depend on the seed alone.
    seed_everything(config.random_seed)
    if origin is None:
        model = build_model(preset, norm_pix_loss=config.pretrain.norm_pix_loss)
    else:
        model = origin.network(norm_pix_loss=config.pretrain.norm_pix_loss)
    val_set = WindowDataset(data.runs, data.val_windows) if data.val_windows else None
    return Trainer(model, masking, WindowDataset(data.runs, data.train_windows), val_set,
                   ctx=ctx, settings=training_settings(config))


def _prepare_outputs(config: Config, out_dir: Path, dataset: InputDataset, *, fresh: bool) -> None:
    """Ready the model folder (cleared for a ``fresh`` run) and the derivatives dataset files."""
    for old in prepare_model_dir(out_dir, fresh=fresh):
        log.info("removed %s of an earlier pretraining", old.name)
    writer = DerivativesWriter(config.output_dir, source_datasets=dataset.datasets)
    writer.ensure_dataset_description()
    writer.ensure_bidsignore(PRETRAIN_BIDSIGNORE)


def _epoch_saver(config: Config, trainer: Trainer, out_dir: Path, meta: CheckpointMeta,
                 history: TrainingHistory, title: str) -> Callable[[EpochMetrics], None]:
    """What runs after each epoch: add it to ``history`` and, on the main process, save it."""

    def on_epoch_end(metrics: EpochMetrics) -> None:
        history.add(metrics)
        if not trainer.ctx.is_main:
            return
        epoch_meta = meta.model_copy(update={"epoch": metrics.epoch, "metrics": metrics.as_row(),
                                              "epochs_planned": config.pretrain.epochs})
        # The log before the checkpoint: --resume keeps the log's rows up to the checkpoint's
        # epoch, so a job killed in between must not lose that epoch's row.
        history.write(out_dir / "training_log.tsv")
        save_checkpoint(out_dir / EPOCH_CHECKPOINT.format(epoch=metrics.epoch), trainer.model, epoch_meta,
                        trainer.optimizer)
        prune_checkpoints(out_dir, KEEP_CHECKPOINTS)
        plot_loss_curve(history.frame, out_dir / "loss_curve.png", title)

    return on_epoch_end


def _fit(config: Config, trainer: Trainer, start_epoch: int, out_dir: Path,
         on_epoch_end: Callable[[EpochMetrics], None]) -> None:
    """Train from ``start_epoch``; on divergence, say what was kept and raise (exit 65)."""
    try:
        trainer.fit(start_epoch, on_epoch_end)
    except TrainingDivergedError as exc:
        if trainer.ctx.is_main and latest_checkpoint(out_dir) is None:
            # Nothing to keep: no empty model folder is left to look like a model.
            for folder in (out_dir, out_dir.parent):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise TrainingDivergedError(f"{exc}; lower --lr (now {config.pretrain.lr:g}). "
                                    + _after_divergence(out_dir)) from exc


def _write_model(config: Config, trainer: Trainer, final: Path, meta: CheckpointMeta,
                 history: TrainingHistory, data: TrainingData, *, wall_seconds: float) -> None:
    """Write the final model, its sidecar with the model card, and ``model.md``."""
    ctx = trainer.ctx
    last = history.last()
    card = model_card.build_card(
        meta, history.frame, machine=model_card.hardware(ctx.device, ctx.world_size),
        data=model_card.training_data(data.dataset, data.runs, data.split, meta.target_tr),
        wall_seconds=wall_seconds)
    save_checkpoint(final.with_suffix(""), trainer.model,
                    meta.model_copy(update={"epoch": int(last.get("epoch", 0)), "metrics": last,
                                            "epochs_planned": config.pretrain.epochs,
                                            "model_card": card}))
    model_card.write_card(final, read_metadata(final))
    log.info("model written to %s", final)


def _after_divergence(directory: Path) -> str:
    """What a diverged run left: the last good checkpoint (kept, resumable) or nothing."""
    last = latest_checkpoint(directory) if directory.is_dir() else None
    if last is None:
        return "No epoch was completed: no model was written"
    return (f"The last good checkpoint, {last.name}, is kept and no new model written: "
            "continue it with --resume and a lower --lr")


def _resume(out_dir: Path, trainer: Trainer,
            meta: CheckpointMeta) -> tuple[int, TrainingHistory]:
    """Load the newest checkpoint in ``out_dir`` into ``trainer``; return the next epoch and log.

    Raises
    ------
    UsageError
        The checkpoint was trained with other settings or data (:data:`RESUME_MUST_MATCH`).
    """
    stem = latest_checkpoint(out_dir) if out_dir.is_dir() else None
    if stem is None:
        log.warning("--resume: no complete checkpoint in %s; starting from epoch 1", out_dir)
        return 1, TrainingHistory()
    saved = read_metadata(stem.with_suffix(".json"))
    # Compared as the sidecars hold them (a field an older sidecar lacks is None, unlike any
    # value); the saved one's keys sorted as in its file, for the message.
    ours, theirs = meta.sidecar_dict(), _sorted_keys(saved.sidecar_dict())
    for sidecar in (ours, theirs):   # the model started from, by its weights (not its path)
        sidecar["init_from"] = (sidecar.get("init_from") or {}).get("weights_sha256")
    for key, what in RESUME_MUST_MATCH.items():
        if json.dumps(theirs.get(key), sort_keys=True) != json.dumps(ours.get(key), sort_keys=True):
            # The options disagree with the checkpoint: a usage error, as for --preset at the
            # participant level.
            value = repr(theirs.get(key))
            raise UsageError(f"--resume: checkpoint {stem.name} was trained with another {what}"
                             + (f" ({value})" if len(value) <= 60 else "")
                             + "; drop --resume (with --overwrite) or choose another OUTPUT_DIR")
    trainer.model.load_state_dict(load_weights(stem, saved))
    trainer.optimizer.load_state_dict(load_optimizer_state(stem, saved))
    epoch = saved.epoch
    history = TrainingHistory.read(out_dir / "training_log.tsv").until(epoch)
    val_loss = saved.metrics.get("val_loss")   # null in JSON without a held-out set
    log.info("resuming from %s (epoch %d, held-out loss %s)", stem.name, epoch,
             "n/a" if val_loss is None else f"{val_loss:.4f}")
    return epoch + 1, history


def _sorted_keys(value: Any) -> Any:
    """``value`` with every dict's keys in sorted order, as in the sidecar file."""
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value
