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
import re
import time
from pathlib import Path

import matplotlib
import pandas as pd
import torch

from bidsapp import __version__, model_card
from bidsapp.atlas import Atlas, load_atlas
from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.bids.layout import InputDataset, discover_runs
from bidsapp.bids.validation import validate_input
from bidsapp.checkpoint import (
    load_optimizer_state,
    load_weights,
    masking_desc,
    read_metadata,
    save_checkpoint,
)
from bidsapp.config import Config
from bidsapp.data import build_region_grid, prepare_runs, split_participants
from bidsapp.distributed import DistributedContext
from bidsapp.errors import BadDataError, TrainingDivergedError, UsageError
from bidsapp.io import atomic_path, ensure_dir
from bidsapp.logs import get_logger
from bidsapp.model.factory import build_model, describe_model
from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.masking import build_masking
from bidsapp.model.presets import BACKBONE_PRESETS, ModelPreset
from bidsapp.preprocess import CachedRun, WindowDataset
from bidsapp.runtime import seed_everything
from bidsapp.training import EpochMetrics, Trainer

log = get_logger("pretrain")

MODELS_DIR = "models"
KEEP_CHECKPOINTS = 2
_EPOCH_STEM = re.compile(r"^epoch-(\d{3,})$")
#: Sidecar entries a checkpoint must share with the run that resumes it, and their names in the
#: error: continuing with another seed, split or input set would silently mix two trainings.
RESUME_MUST_MATCH = {"preset": "preset", "masking": "masking", "atlas": "atlas",
                     "window_frames": "window_frames", "backbone": "backbone",
                     "random_seed": "--random-seed",
                     "split": "split of participants into training and held-out sets",
                     "data": "set of input runs (another selection, or changed files)"}


def pretrain_preset(config: Config) -> ModelPreset:
    """The preset of ``--backbone`` and ``--preset``, or of their defaults for pretraining."""
    backbone = config.model.backbone or config.model.DEFAULT_BACKBONE
    return BACKBONE_PRESETS[backbone][config.model.preset or config.model.DEFAULT_PRESET]


def window_frames(config: Config) -> int:
    """``--window-frames``, or the default for pretraining."""
    return config.preprocess.window_frames or config.preprocess.DEFAULT_WINDOW_FRAMES


def model_dir(output_dir: Path, masking: str) -> Path:
    """Where the models pretrained with ``masking`` live."""
    return output_dir / MODELS_DIR / f"desc-{masking_desc(masking)}"


def model_metadata(config: Config, atlas: Atlas, runs: list[CachedRun],
                   split: dict[str, list[str]]) -> dict:
    """What a checkpoint says about itself: enough to refuse a mismatched config later."""
    preset = pretrain_preset(config)
    return {
        "roimae_version": __version__,
        "backbone": preset.backbone,
        "preset": describe_model(preset),
        "masking": config.masking.model_dump(),
        "norm_pix_loss": config.pretrain.norm_pix_loss,
        "atlas": {"name": atlas.name, "sha256": atlas.sha256(), "n_regions": len(atlas.regions)},
        "grid": {"cube_shape": [96, 96, 96], "space": "MNI152 2 mm (91x109x91) crop/pad to 96^3",
                 "downsample": preset.downsample, "patch_size": preset.patch_size},
        "window_frames": window_frames(config),
        "target_tr": config.preprocess.target_tr,
        "random_seed": config.random_seed,
        "training": config.pretrain.model_dump(exclude={"resume", "overwrite", "torch_compile"}),
        "data": [{"source": r.manifest["source"], "sha256": r.manifest["source_sha256"],
                  "n_windows": r.n_windows} for r in runs],
        "split": split,
    }


def _windows(runs: list[CachedRun], subjects_of_runs: list[str],
             subjects: set[str]) -> list[tuple[int, int]]:
    return [(i, w) for i, (run, sub) in enumerate(zip(runs, subjects_of_runs, strict=True))
            if sub in subjects for w in range(run.n_windows)]


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest epoch checkpoint (its JSON sidecar exists), if any.

    Sidecars are written last and atomically, so one that exists belongs to a complete
    checkpoint; one that does not fit the schema was damaged afterwards, and reading it (in
    :func:`_resume`) refuses it with exit 65 rather than silently resuming from an older epoch.
    """
    best: tuple[int, Path] | None = None
    for sidecar in directory.glob("epoch-*.json"):
        match = _EPOCH_STEM.match(sidecar.stem)
        if not match:
            continue
        epoch = int(match.group(1))
        if best is None or epoch > best[0]:
            best = (epoch, sidecar.with_suffix(""))
    return None if best is None else best[1]


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
    model = directory / "model.json"
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


def clear_model_dir(directory: Path) -> list[Path]:
    """Remove what an earlier pretraining left in ``directory``, before a fresh run.

    ``model.json`` and the checkpoint sidecars go first: once they are gone, nothing left (if this
    is killed part-way) looks like a complete model or a checkpoint to resume.
    """
    first = [directory / "model.json", *directory.glob("epoch-*.json")]
    rest = [directory / "model.safetensors", *directory.glob("epoch-*.safetensors"),
            directory / "training_log.tsv", directory / "loss_curve.png"]
    removed = []
    for path in [*first, *rest]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _prune(directory: Path, keep: int) -> None:
    stems = sorted((int(m.group(1)), p.with_suffix("")) for p in directory.glob("epoch-*.json")
                   if (m := _EPOCH_STEM.match(p.stem)))
    for _, stem in stems[:-keep]:
        # Sidecar first: without it the remaining files are no longer a checkpoint.
        for suffix in (".json", ".safetensors"):
            with contextlib.suppress(FileNotFoundError):
                stem.with_suffix(suffix).unlink()
        with contextlib.suppress(FileNotFoundError):
            (stem.parent / f"{stem.name}_optim.safetensors").unlink()


def plot_loss_curve(history: pd.DataFrame, path: Path, title: str) -> None:
    """Training and held-out loss per epoch, as a PNG."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(history["epoch"], history["train_loss"], "o-", label="training")
    if history["val_loss"].notna().any():
        ax.plot(history["epoch"], history["val_loss"], "s-", label="held-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked reconstruction MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_pretrain(config: Config, device: torch.device) -> Path:
    """Pretrain one model; return the path of the final ``model.safetensors``."""
    ctx = DistributedContext.setup(device)
    try:
        return _pretrain(config, ctx)
    finally:
        ctx.shutdown()


def _pretrain(config: Config, ctx: DistributedContext) -> Path:
    started = time.perf_counter()
    preset = pretrain_preset(config)
    if window_frames(config) % preset.tubelet:
        raise UsageError(f"the {preset.backbone} {preset.name} preset reads tokens of {preset.tubelet} "
                         f"frames: --window-frames {window_frames(config)} is not a multiple of it")
    out_dir = model_dir(config.output_dir, config.masking.masking)
    check_model_dir(config, out_dir)
    atlas = load_atlas(config.atlas, config.atlas_labels)
    dataset: InputDataset = discover_runs(config)
    if ctx.is_main:
        validate_input(config, dataset)
    runs = prepare_runs(config, dataset.runs, window_frames(config), preset.downsample)
    subjects = [run.subject for run in dataset.runs]
    train_subjects, val_subjects = split_participants(subjects, config.pretrain.val_fraction,
                                                      config.random_seed)
    train_idx = _windows(runs, subjects, set(train_subjects))
    val_idx = _windows(runs, subjects, set(val_subjects))
    if not train_idx:
        raise BadDataError("no training windows: every run is shorter than --window-frames "
                           f"{window_frames(config)}")
    log.info("%d runs, %d training windows (%d participants), %d held-out windows (%d)",
             len(runs), len(train_idx), len(train_subjects), len(val_idx), len(val_subjects))

    region_grid = build_region_grid(atlas, preset)
    masking = build_masking(config.masking.masking, region_grid.to(ctx.device),
                            config.masking.mask_ratio, unit=config.masking.mask_ratio_unit,
                            time=config.masking.mask_time)
    seed_everything(config.random_seed)
    model = build_model(preset, norm_pix_loss=config.pretrain.norm_pix_loss)
    trainer = Trainer(model, masking, WindowDataset(runs, train_idx),
                      WindowDataset(runs, val_idx) if val_idx else None, ctx=ctx,
                      seed=config.random_seed, epochs=config.pretrain.epochs,
                      batch_size=config.pretrain.batch_size, lr=config.pretrain.lr,
                      weight_decay=config.pretrain.weight_decay,
                      warmup_epochs=config.pretrain.warmup_epochs,
                      clip_grad=config.pretrain.clip_grad,
                      num_workers=max(0, config.nprocs - 1),
                      compile_model=config.pretrain.torch_compile)

    meta = model_metadata(config, atlas, runs, {"train": train_subjects, "val": val_subjects})
    history = pd.DataFrame(columns=list(EpochMetrics.__dataclass_fields__))
    start_epoch = 1
    if config.pretrain.resume:
        start_epoch, history = _resume(out_dir, model, trainer, meta)
    if ctx.is_main:
        ensure_dir(out_dir)
        # Temporary files of a job killed while writing here (atomic writes it never finished).
        for stale in out_dir.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
        if start_epoch == 1:
            # A fresh run (--overwrite, or nothing to resume): no file of an earlier run may stay
            # beside the new one's, to be pruned in the wrong order or resumed later.
            for old in clear_model_dir(out_dir):
                log.info("removed %s of an earlier pretraining", old.name)
        writer = DerivativesWriter(config.output_dir, source_datasets=dataset.datasets)
        writer.ensure_dataset_description()
        writer.ensure_bidsignore([MODELS_DIR, "logs"])

    def on_epoch_end(metrics: EpochMetrics) -> None:
        nonlocal history
        history = pd.concat([history[history["epoch"] < metrics.epoch],
                             pd.DataFrame([metrics.as_row()])], ignore_index=True)
        if not ctx.is_main:
            return
        epoch_meta = dict(meta, epoch=metrics.epoch, metrics=metrics.as_row(),
                          epochs_planned=config.pretrain.epochs)
        # The log before the checkpoint: --resume keeps the log's rows up to the checkpoint's
        # epoch, so a job killed in between must not lose that epoch's row.
        with atomic_path(out_dir / "training_log.tsv") as tmp:
            history.to_csv(tmp, sep="\t", index=False, na_rep="n/a")
        save_checkpoint(out_dir / f"epoch-{metrics.epoch:03d}", model, epoch_meta,
                        trainer.optimizer)
        _prune(out_dir, KEEP_CHECKPOINTS)
        plot_loss_curve(history, out_dir / "loss_curve.png",
                        f"{config.masking.masking} masking, {preset.backbone} {preset.name} preset")

    if start_epoch <= config.pretrain.epochs:
        try:
            trainer.fit(start_epoch, on_epoch_end)
        except TrainingDivergedError as exc:
            if ctx.is_main and latest_checkpoint(out_dir) is None:
                # Nothing to keep: no empty model folder is left to look like a model.
                for folder in (out_dir, out_dir.parent):
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            raise TrainingDivergedError(f"{exc}; lower --lr (now {config.pretrain.lr:g}). "
                                        + _after_divergence(out_dir)) from exc
    else:
        log.info("all %d epochs are already done in %s", config.pretrain.epochs, out_dir)
    final = out_dir / "model.safetensors"
    if ctx.is_main:
        last = history.iloc[-1].to_dict() if len(history) else {}
        card = model_card.build_card(
            meta, history, machine=model_card.hardware(ctx.device, ctx.world_size),
            data=model_card.training_data(dataset, runs, meta["split"], config.preprocess.target_tr),
            wall_seconds=time.perf_counter() - started)
        save_checkpoint(out_dir / "model", model,
                        dict(meta, epoch=int(last.get("epoch", 0)), metrics=last,
                             epochs_planned=config.pretrain.epochs, model_card=card))
        model_card.write_card(final, read_metadata(final))
        log.info("model written to %s", final)
    return final


def _after_divergence(directory: Path) -> str:
    """What a diverged run left: the last good checkpoint (kept, resumable) or nothing."""
    last = latest_checkpoint(directory) if directory.is_dir() else None
    if last is None:
        return "No epoch was completed: no model was written"
    return (f"The last good checkpoint, {last.name}, is kept and no new model written: "
            "continue it with --resume and a lower --lr")


def _resume(out_dir: Path, model: MaskedAutoencoder, trainer: Trainer,
            meta: dict) -> tuple[int, pd.DataFrame]:
    stem = latest_checkpoint(out_dir) if out_dir.is_dir() else None
    if stem is None:
        log.warning("--resume: no complete checkpoint in %s; starting from epoch 1", out_dir)
        return 1, pd.DataFrame(columns=list(EpochMetrics.__dataclass_fields__))
    saved = read_metadata(stem.with_suffix(".json"))
    for key, what in RESUME_MUST_MATCH.items():
        if json.dumps(saved.get(key), sort_keys=True) != json.dumps(meta[key], sort_keys=True):
            # The options disagree with the checkpoint: a usage error, as for --preset at the
            # participant level.
            value = repr(saved.get(key))
            raise UsageError(f"--resume: checkpoint {stem.name} was trained with another {what}"
                             + (f" ({value})" if len(value) <= 60 else "")
                             + "; drop --resume (with --overwrite) or choose another OUTPUT_DIR")
    model.load_state_dict(load_weights(stem, saved))
    trainer.optimizer.load_state_dict(load_optimizer_state(stem, saved))
    history = _read_training_log(out_dir / "training_log.tsv")
    epoch = int(saved["epoch"])
    history = history[history["epoch"] <= epoch].reset_index(drop=True)
    val_loss = saved["metrics"].get("val_loss")   # null in JSON without a held-out set
    log.info("resuming from %s (epoch %d, held-out loss %s)", stem.name, epoch,
             "n/a" if val_loss is None else f"{val_loss:.4f}")
    return epoch + 1, history


def _read_training_log(path: Path) -> pd.DataFrame:
    """The training log of the run being resumed (empty when there is none yet).

    Raises :class:`BadDataError` (exit 65) for a log that is empty, unreadable or without the
    columns this version writes.
    """
    columns = list(EpochMetrics.__dataclass_fields__)
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    try:
        history = pd.read_csv(path, sep="\t", na_values="n/a")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BadDataError(f"--resume: the training log {path} is damaged "
                           f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                           "restore it or start a new OUTPUT_DIR") from exc
    missing = [c for c in columns if c not in history.columns]
    if missing or not pd.api.types.is_numeric_dtype(history["epoch"]):
        raise BadDataError(f"--resume: the training log {path} is damaged (columns "
                           f"{', '.join(missing) or 'epoch'} missing or not numbers); restore it "
                           "or start a new OUTPUT_DIR")
    return history
