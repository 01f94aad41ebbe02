"""``roimae import-model``: a SwiFT or NeuroSTORM Lightning checkpoint -> a roimae model folder.

The checkpoint is read with ``torch.load(weights_only=True)`` only
(:func:`bidsapp.model.upstream.read_lightning_checkpoint`: nothing in the file runs), its network
rebuilt exactly (:mod:`bidsapp.model.upstream_mae`), and written as a model roimae trained:
``OUTPUT_DIR/models/desc-<name>/`` with ``model.safetensors``, ``model.json`` (whose ``upstream``
holds the network's configuration and where it came from) and the card ``model.md``. Every level
then takes it through ``--model`` / ``--model-desc``.

The folder is written under a temporary name and renamed when complete: a refused checkpoint, a
full disk or a signal leaves no model folder, and an existing one is only replaced with
``--overwrite``.

What the card says about each family (:data:`SOURCES`) is what upstream states: its repository,
the commit whose code roimae's rewrite reproduces, its licence (NeuroSTORM's LICENSE file and its
README disagree: both are given), the data its released files were pretrained on, and the input
convention its own preprocessing code applies, beside what roimae does.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bidsapp import model_card
from bidsapp._version import __version__
from bidsapp.atlas import Atlas
from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.checkpoint import FORMAT, CheckpointMeta, read_metadata, save_checkpoint
from bidsapp.config import UPSTREAM_FAMILIES, check_model_desc
from bidsapp.errors import NoInputError, UsageError
from bidsapp.io import ensure_dir, file_sha256
from bidsapp.logs import get_logger
from bidsapp.model.factory import build_upstream_model
from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.upstream import UpstreamCheckpoint, UpstreamCheckpointError, read_lightning_checkpoint
from bidsapp.outputs import MODEL_WEIGHTS, PRETRAIN_BIDSIGNORE, model_dir

log = get_logger("import")


@dataclass(frozen=True)
class UpstreamSource:
    """What upstream states about one family's code, weights and inputs (for the card)."""

    name: str
    repository: str
    weights_url: str
    #: The upstream commit whose model code roimae reproduces, by mask-token layout.
    code_commits: dict[str, str]
    license: str
    #: Known released files -> the data upstream says they were trained on.
    released_files: dict[str, str]
    pretrained_on_default: str
    citation: str
    #: The TR upstream resamples every run to (``None``: each dataset's own TR).
    target_tr: float | None
    #: Upstream's preprocessing, step by step, and what roimae does at that step.
    convention: list[tuple[str, str, str]] = field(default_factory=list)


_DATA_USE = ("the weights were learned from these datasets; their data-use terms (e.g. the UK "
             "Biobank, ABCD and HCP data use agreements) may apply to the weights and to what is "
             "derived from them: check them before sharing or publishing")

#: The two families ``roimae import-model --from`` reads.
SOURCES: dict[str, UpstreamSource] = {
    "neurostorm": UpstreamSource(
        name="NeuroSTORM",
        repository="https://github.com/CUHK-AIM-Group/NeuroSTORM",
        weights_url="https://huggingface.co/zxcvb20001/NeuroSTORM",
        code_commits={"released": "8419eb0", "latest": "a8dc38f"},
        license=("Apache-2.0 according to NeuroSTORM's LICENSE file; MIT according to its README "
                 "(badge and project structure) and its Hugging Face model card: the two "
                 "statements disagree, both are given here"),
        released_files={},
        pretrained_on_default=(
            "NeuroSTORM's pretraining corpus of public fMRI datasets (its documentation "
            "prepares UK Biobank, ABCD and HCP among others for pretraining; Wang et al., "
            "'Towards a general-purpose foundation model for fMRI analysis'); upstream does not "
            "name the datasets of each released file: see its Hugging Face model card"),
        citation="Wang et al., Towards a general-purpose foundation model for fMRI analysis",
        target_tr=0.8,
        convention=[
            ("grid", "MNI152 at 2 mm; the middle 96^3 (select_middle_96, padded to 96)",
             "the same 96^3 cube of the MNI 2 mm grid"),
            ("time", "resampled to TR 0.8 s (linear)", "resampled to TR 0.8 s (the model's target TR)"),
            ("intensity", "negative values set to 0, then z-scored once per run over brain "
             "voxels and frames", "z-scored once per run over brain voxels and frames; negative "
             "values are kept (not zeroed)"),
            ("background", "the run's smallest z-scored brain value", "each window's smallest "
             "brain value (background 'min')"),
            ("window", "consecutive frames (20 in the fine-tuning scripts)",
             "consecutive windows of the network's frames"),
        ],
    ),
    "swift": UpstreamSource(
        name="SwiFT",
        repository="https://github.com/Transconnectome/SwiFT",
        weights_url="https://github.com/Transconnectome/SwiFT/tree/main/pretrained_models",
        code_commits={"released": "95b20e8", "latest": "95b20e8"},
        license="Apache-2.0 (SwiFT's LICENSE file)",
        released_files={
            "contrastive_pretrained.ckpt": "HCP, ABCD and UKB (contrastive pretraining; SwiFT's "
                                           "README, section 8)",
            "hcp_sex_classification.ckpt": "HCP, trained from scratch for sex classification "
                                           "(SwiFT's README, section 8)",
        },
        pretrained_on_default="not stated for this file name; SwiFT's released "
                              "contrastive_pretrained.ckpt was pretrained on HCP, ABCD and UKB",
        citation="Kim et al., SwiFT: Swin 4D fMRI Transformer, NeurIPS 2023",
        target_tr=None,
        convention=[
            ("grid", "MNI152 at 2 mm, cropped or padded to 96^3 per dataset (UKB's y axis one "
             "voxel differently from HCP's and ABCD's)", "one 96^3 crop of the MNI 2 mm grid "
             "for every dataset"),
            ("time", "each dataset's own TR (no resampling)", "not resampled"),
            ("intensity", "z-scored once per run over brain voxels and frames",
             "the same"),
            ("background", "the run's smallest z-scored brain value", "each window's smallest "
             "brain value (background 'min')"),
            ("window", "consecutive frames (20 in the released configuration)",
             "consecutive windows of the network's frames"),
        ],
    ),
}


def _plain(value: Any) -> Any:
    """JSON-ready hyperparameter values (others as text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def upstream_info(imported: UpstreamCheckpoint, checkpoint: Path, sha256: str) -> dict[str, Any]:
    """The sidecar's ``upstream`` (:class:`~bidsapp.checkpoint.UpstreamInfo`) of an import."""
    config = imported.config
    source = SOURCES[config.family]
    return {
        "family": config.family,
        "config": config.describe(),
        "background": "min",
        "source": checkpoint.name,
        "source_sha256": sha256,
        "dropped": list(imported.dropped),
        "repository": source.repository,
        "code_commit": source.code_commits[config.mask_token_layout],
        "weights_url": source.weights_url,
        "license": source.license,
        "pretrained_on": source.released_files.get(checkpoint.name, source.pretrained_on_default),
    }


def import_card(meta: CheckpointMeta, imported: UpstreamCheckpoint,
                model: MaskedAutoencoder) -> dict[str, Any]:
    """The facts of an imported model's card (kept under ``model_card`` in its sidecar)."""
    info = meta.upstream
    source = SOURCES[info.family]
    return {
        "kind": "imported",
        "roimae_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": meta.backbone,
        "preset": meta.preset.name,
        "upstream": source.name,
        "citation": source.citation,
        "source": info.model_dump(exclude={"config"}),
        "network": info.config,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "window_frames": meta.window_frames,
        "target_tr": meta.target_tr,
        "atlas": meta.atlas.model_dump(exclude_unset=True),
        "data_use": _DATA_USE,
        "input_convention": [{"step": step, "upstream": theirs, "roimae": ours}
                             for step, theirs, ours in source.convention],
        "hyper_parameters": {k: _plain(v) for k, v in sorted(imported.hyper_parameters.items())},
        "has_decoder": model.has_decoder,
        "no_decoder_reason": model.no_decoder_reason,
    }


def _metadata(imported: UpstreamCheckpoint, model: MaskedAutoencoder, checkpoint: Path,
              sha256: str, desc: str, atlas: Atlas) -> CheckpointMeta:
    config = imported.config
    preset = {**model.preset.describe(), "n_parameters": sum(p.numel() for p in model.parameters())}
    meta = CheckpointMeta.model_validate({
        "format": FORMAT, "epoch": 0, "roimae_version": __version__, "desc": desc,
        "backbone": config.family, "preset": preset,
        "atlas": {"name": atlas.name, "sha256": atlas.sha256(), "n_regions": len(atlas.regions)},
        "grid": {"cube_shape": [96, 96, 96], "space": "MNI152 2 mm (91x109x91) crop/pad to 96^3",
                 "downsample": 1, "patch_size": config.patch_size[0]},
        "window_frames": config.img_size[3],
        "target_tr": SOURCES[config.family].target_tr,
        "upstream": upstream_info(imported, checkpoint, sha256),
    })
    return meta.model_copy(update={"model_card": import_card(meta, imported, model)})


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a model folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UsageError(f"{target} already holds a model; pass --overwrite to replace it, or "
                         "choose another --desc or OUTPUT_DIR")


def import_model(checkpoint: Path, output_dir: Path, family: str, *, atlas: Atlas,
                 desc: str | None = None, overwrite: bool = False) -> Path:
    """Import an upstream Lightning checkpoint as the roimae model ``OUTPUT_DIR/models/desc-<desc>``.

    Parameters
    ----------
    checkpoint : Path
        SwiFT's or NeuroSTORM's ``.ckpt`` (e.g. ``pt_fmrifound_mae_ratio0.5.ckpt``).
    output_dir : Path
        The roimae output folder the model goes into.
    family : {"neurostorm", "swift"}
        What the checkpoint holds (checked against its weights and hyperparameters).
    atlas : Atlas
        Recorded as the model's atlas: the upstream networks know none, but roimae's region
        readouts and attribution use it.
    desc : str, optional
        The model's ``desc-`` label (default: ``family``).
    overwrite : bool
        Replace a model folder of that name.

    Returns
    -------
    Path
        The model's ``model.safetensors``.

    Raises
    ------
    bidsapp.errors.RoimaeError
        A bad ``--desc`` or an existing model without ``overwrite`` (64); a checkpoint that
        cannot be imported: a pickle payload, unknown keys, shapes that do not fit, a network
        that does not read the 96^3 cube (65, one line); no such file (66).
    """
    if family not in UPSTREAM_FAMILIES:
        raise UsageError(f"--from {family!r}: choose one of {', '.join(UPSTREAM_FAMILIES)}")
    desc = check_model_desc(desc or family)
    target = model_dir(Path(output_dir), desc)
    _refuse_existing(target, overwrite)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise NoInputError(f"checkpoint {checkpoint} does not exist")
    imported = read_lightning_checkpoint(checkpoint, family)
    config = imported.config
    if config.family == "neurostorm" and not config.mae:
        raise UpstreamCheckpointError(f"{checkpoint}: a NeuroSTORM encoder without its MAE decoder "
                                      "(a fine-tuned model); import a pretraining checkpoint "
                                      "(e.g. pt_fmrifound_mae_ratio0.5.ckpt)")
    try:
        model = build_upstream_model(config)
    except ValueError as exc:
        raise UpstreamCheckpointError(f"{checkpoint}: {exc}") from None
    model.net.load_state_dict(imported.model.state_dict(), strict=True)
    meta = _metadata(imported, model, checkpoint, file_sha256(checkpoint), desc, atlas)
    writer = DerivativesWriter(Path(output_dir))
    writer.ensure_dataset_description()
    writer.ensure_bidsignore(PRETRAIN_BIDSIGNORE)
    _write_folder(model, meta, target, overwrite=overwrite)
    log.info("imported %s %s (sha256 %s...) as %s", SOURCES[family].name, checkpoint.name,
             meta.upstream.source_sha256[:12], target)
    return target / MODEL_WEIGHTS


def _write_folder(model: MaskedAutoencoder, meta: CheckpointMeta, target: Path, *, overwrite: bool) -> None:
    """Write the model folder under a temporary name, then rename it into place."""
    models = ensure_dir(target.parent)
    token = secrets.token_hex(4)
    staging = ensure_dir(models / f".{target.name}.{token}.tmp")   # as any folder, by the umask
    old = None
    try:
        weights = save_checkpoint((staging / MODEL_WEIGHTS).with_suffix(""), model, meta)
        model_card.write_card(weights, read_metadata(weights))
        if target.exists():
            _refuse_existing(target, overwrite)   # again: another job may have written it
            old = target.rename(models / f".{target.name}.{token}.old")
        staging.rename(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

