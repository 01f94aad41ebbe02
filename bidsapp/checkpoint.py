"""Checkpoints as safetensors + JSON: nothing read from disk is ever unpickled.

A checkpoint is ``<stem>.safetensors`` (the model weights) beside ``<stem>.json`` (what the model is: preset,
masking, atlas, grid, training data and metrics). The optimizer state of a training checkpoint is a second
safetensors file, ``<stem>_optim.safetensors``, whose non-tensor parts live in the JSON sidecar.

Every sidecar read is validated by one schema, :class:`CheckpointMeta`: a sidecar that does not fit it
(a field of the wrong type, a file name with a directory part, ...) is bad data (exit 65), never a crash
further on; the rest of roimae reads it through the attributes of that model, not by keys.

The upkeep of a model folder lives here too: the newest epoch checkpoint (:func:`latest_checkpoint`),
pruning older ones (:func:`prune_checkpoints`) and clearing an earlier run (:func:`prepare_model_dir`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bidsapp.config import LABEL_PATTERN, BackboneName, MaskingName, PresetName, UpstreamFamily
from bidsapp.errors import BadDataError, NoInputError, UsageError
from bidsapp.io import atomic_path, ensure_dir, file_sha256, json_text
from bidsapp.model.upstream import UpstreamConfig
from bidsapp.outputs import EPOCH_STEM, MODEL_SIDECAR, MODEL_WEIGHTS

FORMAT = "roimae-checkpoint/1"


def _bare_file_name(value: str) -> str:
    # A sidecar names files beside it; a path could make --resume read (or prune) any file.
    if value in ("", ".", "..") or Path(value).name != value or "\\" in value:
        raise ValueError(f"{value!r} is not a bare file name in the checkpoint's folder")
    return value


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return value


FileName = Annotated[str, AfterValidator(_bare_file_name)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Part(BaseModel):
    # strict: "10" is not 10 and 1.0 is not an epoch; extra keys are kept (newer writers may add
    # some), so only what roimae reads is constrained.
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class PresetInfo(_Part):
    """``preset`` of a sidecar (:func:`~bidsapp.model.factory.describe_model`)."""

    name: PresetName


class MaskingInfo(_Part):
    """``masking`` of a sidecar (the pretrain level's masking settings)."""

    masking: MaskingName
    mask_ratio: float = Field(0.5, gt=0, lt=1)
    mask_ratio_unit: Literal["regions", "tokens"] = "regions"
    mask_time: Literal["tube", "random"] = "tube"


class AtlasInfo(_Part):
    """``atlas`` of a sidecar: the atlas the model was trained with."""

    name: str
    sha256: Sha256
    n_regions: int = Field(ge=1)


class UpstreamInfo(_Part):
    """``upstream`` of a sidecar: the SwiFT or NeuroSTORM network of the model, and where it came from.

    ``config`` (:class:`~bidsapp.model.upstream.UpstreamConfig` as plain values) is what the
    network is rebuilt from; the rest is provenance, set by ``roimae import-model``
    (:mod:`bidsapp.importer`) and kept by every pretraining continued from it (``None`` for a
    network roimae pretrained from fresh weights).
    """

    family: UpstreamFamily
    config: dict[str, Any]
    #: How voxels outside the brain are filled (:mod:`bidsapp.model.upstream_mae`).
    background: Literal["min", "zero"] = "min"
    source: str | None = None
    source_sha256: Sha256 | None = None
    dropped: list[str] = Field(default_factory=list)
    repository: str | None = None
    code_commit: str | None = None
    weights_url: str | None = None
    license: str | None = None
    pretrained_on: str | None = None

    @model_validator(mode="after")
    def _builds(self) -> UpstreamInfo:
        config = self.network_config()   # a ValueError names what does not fit
        if config.family != self.family:
            raise ValueError(f"upstream config of family {config.family!r} under {self.family!r}")
        if config.img_size[:3] != (96, 96, 96):
            raise ValueError(f"upstream config img_size {list(config.img_size)} does not read "
                             "roimae's 96^3 cube")
        return self

    def network_config(self) -> UpstreamConfig:
        """The :class:`~bidsapp.model.upstream.UpstreamConfig` of :attr:`config`."""
        try:
            return UpstreamConfig(**{**self.config, "family": self.family})
        except TypeError as exc:   # an unknown key, or a value of the wrong kind
            raise ValueError(f"upstream config: {exc}") from None


class InitInfo(_Part):
    """``init_from`` of a sidecar: the model a pretraining continued from (``--init-from``)."""

    path: str
    weights_sha256: Sha256
    backbone: BackboneName
    preset: str
    desc: str | None = None
    epoch: int = Field(0, ge=0)
    masking: str | None = None


class OptimizerInfo(_Part):
    """``optimizer`` of a training checkpoint: its state file and the non-tensor state."""

    file: FileName
    structure: dict[str, Any]
    sha256: Sha256


class RunInfo(_Part):
    """One entry of ``data`` in a sidecar: an input run the model was trained on."""

    source: str
    sha256: str
    n_windows: int = Field(ge=0)


class CheckpointMeta(_Part):
    """The schema of a checkpoint's JSON sidecar, as :func:`save_checkpoint` writes it.

    Read through attributes (``meta.atlas.sha256``), never through string keys. The fields that
    roimae reads are required; those it only records are optional, so that the sidecars of older
    versions still load. Only the fields given (or read) are written back
    (:meth:`sidecar_dict`): a sidecar read and saved again keeps its keys.

    The pretrain level builds one per model (:func:`bidsapp.pretrain.model_metadata`) with
    ``epoch`` 0; each checkpoint is a copy with its epoch and metrics
    (:meth:`pydantic.BaseModel.model_copy`).
    """

    format: Literal["roimae-checkpoint/1"]
    weights: FileName | None = None
    #: Checked against the weights when present (a sidecar without it still loads: safetensors
    #: alone refuses what is not a tensor file).
    weights_sha256: Sha256 | None = None
    backbone: BackboneName
    preset: PresetInfo
    #: How roimae pretrained it; ``None`` only for an imported upstream model (``upstream``).
    masking: MaskingInfo | None = None
    atlas: AtlasInfo
    window_frames: int = Field(ge=1, le=1024)
    target_tr: Annotated[float | None, AfterValidator(_finite)] = Field(None, gt=0)
    norm_pix_loss: bool = False
    epoch: int = Field(ge=0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    optimizer: OptimizerInfo | None = None
    # Recorded for people and for --resume's checks; absent from the oldest sidecars.
    roimae_version: str | None = None
    grid: dict[str, Any] | None = None
    random_seed: int | None = None
    training: dict[str, Any] | None = None
    data: list[RunInfo] | None = None
    split: dict[str, list[str]] | None = None
    epochs_planned: int | None = None
    model_card: dict[str, Any] | None = None
    #: The ``desc-`` label of the model's outputs when it is not its masking's (an imported model).
    desc: Annotated[str, Field(pattern=LABEL_PATTERN.pattern)] | None = None
    #: The SwiFT or NeuroSTORM network (backbones ``swift`` and ``neurostorm``), and its origin.
    upstream: UpstreamInfo | None = None
    #: The model this one was pretrained from (``--init-from``).
    init_from: InitInfo | None = None

    @model_validator(mode="after")
    def _fits_the_backbone(self) -> CheckpointMeta:
        from bidsapp.model.presets import BACKBONE_PRESETS, UPSTREAM_BACKBONES

        if self.preset.name not in BACKBONE_PRESETS[self.backbone]:
            raise ValueError(f"preset: {self.backbone} has no preset {self.preset.name!r}")
        if self.backbone in UPSTREAM_BACKBONES:
            if self.upstream is None or self.upstream.family != self.backbone:
                raise ValueError(f"upstream: a {self.backbone} model needs its {self.backbone} "
                                 "network configuration")
            frames = self.upstream.network_config().img_size[3]
            if self.window_frames != frames:
                raise ValueError(f"window_frames {self.window_frames} is not the {frames} frames "
                                 f"of the {self.backbone} network's time embeddings")
        elif self.upstream is not None:
            raise ValueError(f"upstream: a {self.backbone} model has no upstream network")
        if self.masking is None and self.upstream is None:
            raise ValueError("masking: Field required (only an imported upstream model has none)")
        tubelet = BACKBONE_PRESETS[self.backbone][self.preset.name].tubelet
        if self.window_frames % tubelet:
            raise ValueError(f"window_frames {self.window_frames} is not a multiple of the "
                             f"{self.backbone} tubelet ({tubelet} frames)")
        return self

    def sidecar_dict(self) -> dict[str, Any]:
        """The sidecar as a JSON-ready dict: the fields given or read, and nothing else."""
        # exclude_unset: no default (null, {}) is added to a sidecar that did not have it.
        return self.model_dump(exclude_unset=True)


def validate_metadata(text: str | bytes, where: Path) -> CheckpointMeta:
    """Validate a sidecar's JSON text with :class:`CheckpointMeta`.

    Raises
    ------
    BadDataError
        Not JSON (or nested deeper than the JSON parser allows), not a roimae sidecar, or a field
        that does not fit the schema; the message names the first offending field.
    """
    try:
        return CheckpointMeta.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where_in = ".".join(str(part) for part in first["loc"])
        if first["type"] == "json_invalid":
            raise BadDataError(f"checkpoint sidecar {where} is not valid JSON: "
                               f"{first['msg'].removeprefix('Invalid JSON: ')}") from exc
        if where_in == "format":
            raise BadDataError(f"{where} is not a roimae checkpoint sidecar (format "
                               f"{FORMAT!r})") from exc
        detail = first["msg"].removeprefix("Value error, ")
        raise BadDataError(f"checkpoint sidecar {where} is invalid: "
                           f"{where_in + ': ' if where_in else ''}{detail}") from exc


def save_checkpoint(stem: Path, model: torch.nn.Module, metadata: CheckpointMeta,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``stem.safetensors`` (+ ``stem_optim.safetensors``) and then ``stem.json``, atomically.

    The JSON sidecar is written last and names the weight file's hash, so a sidecar only exists for
    a complete checkpoint: a crash mid-save leaves an older complete checkpoint as the newest one.
    Every file is written to a temporary name first and the three are renamed only once all are
    written, so a full disk (:class:`~bidsapp.errors.IOFailureError`, exit 74) leaves no weights
    without their sidecar.
    """
    weights = stem.with_suffix(".safetensors")
    optim_path = stem.parent / f"{stem.name}_optim.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with contextlib.ExitStack() as stack:
        # Entered sidecar first, so that it is renamed last (contexts exit in reverse order).
        sidecar_tmp = stack.enter_context(atomic_path(stem.with_suffix(".json")))
        optim_tmp = stack.enter_context(atomic_path(optim_path)) if optimizer is not None else None
        weights_tmp = stack.enter_context(atomic_path(weights))
        _save_tensors(state, weights_tmp)
        meta = dict(metadata.sidecar_dict(), format=FORMAT, weights=weights.name,
                    weights_sha256=file_sha256(weights_tmp))
        if optimizer is not None:
            tensors, structure = _flatten_optimizer(optimizer.state_dict())
            _save_tensors(tensors, optim_tmp)
            meta["optimizer"] = {"file": optim_path.name, "structure": structure,
                                 "sha256": file_sha256(optim_tmp)}
        sidecar_tmp.write_text(json_text(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return weights


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """:func:`safetensors.torch.save_file`, its I/O errors as :class:`OSError` (full disk: 74)."""
    try:
        save_file(tensors, str(path), metadata={"format": FORMAT})
    except SafetensorError as exc:
        # safetensors reports "I/O error: No space left on device (os error 28)" as its own type.
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from exc


def read_metadata(path: Path) -> CheckpointMeta:
    """Read the JSON sidecar of a checkpoint given its ``.safetensors`` or ``.json`` path.

    Raises
    ------
    UsageError
        ``path`` is neither (a pickled checkpoint, exit 64).
    NoInputError
        The sidecar does not exist (exit 66).
    BadDataError
        It cannot be read or does not fit :class:`CheckpointMeta` (exit 65).
    """
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix != ".json":
        raise UsageError(f"checkpoint {path} must be a .safetensors file with a .json sidecar "
                         "(pickled PyTorch checkpoints are refused: they can run code)")
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise NoInputError(f"checkpoint sidecar {sidecar} does not exist")
    try:
        text = sidecar.read_bytes()
    except OSError as exc:
        raise BadDataError(f"cannot read checkpoint sidecar {sidecar}: {exc.strerror}") from exc
    return validate_metadata(text, sidecar)


def load_weights(path: Path, meta: CheckpointMeta | None = None) -> dict[str, torch.Tensor]:
    """Load the weights of a checkpoint with safetensors (never pickle), checking its hash."""
    weights = Path(path).with_suffix(".safetensors")
    if not weights.is_file():
        raise NoInputError(f"checkpoint {weights} does not exist")
    if meta is not None and meta.weights_sha256 not in (None, file_sha256(weights)):
        raise BadDataError(f"checkpoint {weights} does not match the hash in its sidecar "
                           "(truncated or replaced file)")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadDataError(f"checkpoint {weights} is not a valid safetensors file "
                           f"(truncated, or a pickle, which is refused): {exc}") from exc


def load_optimizer_state(stem: Path, meta: CheckpointMeta) -> dict[str, Any]:
    """Rebuild an optimizer ``state_dict`` saved by :func:`save_checkpoint`."""
    info = meta.optimizer
    if info is None:
        raise BadDataError(f"checkpoint {stem} holds no optimizer state; cannot resume from it")
    # The schema accepts only a bare file name: the state is read from the checkpoint's folder.
    path = stem.parent / _bare_file_name(info.file)
    if not path.is_file():
        raise BadDataError(f"optimizer state {path} named by checkpoint {stem.name} is missing; "
                           "cannot resume from it")
    if file_sha256(path) != info.sha256:
        raise BadDataError(f"optimizer state {path} does not match its sidecar hash")
    try:
        tensors = load_file(str(path))
        return _unflatten_optimizer(tensors, info.structure)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise BadDataError(f"optimizer state {path} is not a valid safetensors file: {exc}") from exc


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    # Tensors go to safetensors under "state.<param>.<name>"; everything else (param groups, step
    # counters stored as Python numbers) is JSON-serialisable and goes to the sidecar.
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, entry in structure.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(entry)
    return {"state": state, "param_groups": structure["param_groups"]}


# Checkpoint-folder upkeep: which checkpoint is newest, pruning old ones, clearing a folder.

def latest_checkpoint(directory: Path) -> Path | None:
    """The newest epoch checkpoint (its JSON sidecar exists), if any.

    Sidecars are written last and atomically, so one that exists belongs to a complete
    checkpoint; one that does not fit the schema was damaged afterwards, and reading it (on
    ``--resume``) refuses it with exit 65 rather than silently resuming from an older epoch.
    """
    best: tuple[int, Path] | None = None
    for sidecar in directory.glob("epoch-*.json"):
        match = EPOCH_STEM.match(sidecar.stem)
        if not match:
            continue
        epoch = int(match.group(1))
        if best is None or epoch > best[0]:
            best = (epoch, sidecar.with_suffix(""))
    return None if best is None else best[1]


def prepare_model_dir(directory: Path, *, fresh: bool) -> list[Path]:
    """Create ``directory`` for a pretraining, without the leftovers of earlier jobs.

    Parameters
    ----------
    directory : Path
        The model folder (``models/desc-<masking>``).
    fresh : bool
        A new training (``--overwrite``, or nothing to resume): the files of an earlier run are
        removed too (:func:`clear_model_dir`).

    Returns
    -------
    list of Path
        The files of an earlier run that were removed.
    """
    ensure_dir(directory)
    # Temporary files of a job killed while writing here (atomic writes it never finished).
    for stale in directory.glob(".*.tmp*"):
        stale.unlink(missing_ok=True)
    # A fresh run: no file of an earlier run may stay beside the new one's, to be pruned in the
    # wrong order or resumed later.
    return clear_model_dir(directory) if fresh else []


def clear_model_dir(directory: Path) -> list[Path]:
    """Remove what an earlier pretraining left in ``directory``, before a fresh run.

    ``model.json`` and the checkpoint sidecars go first: once they are gone, nothing left (if this
    is killed part-way) looks like a complete model or a checkpoint to resume.
    """
    first = [directory / MODEL_SIDECAR, *directory.glob("epoch-*.json")]
    rest = [directory / MODEL_WEIGHTS, *directory.glob("epoch-*.safetensors"),
            directory / "training_log.tsv", directory / "loss_curve.png"]
    removed = []
    for path in [*first, *rest]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest epoch checkpoints in ``directory``.

    Parameters
    ----------
    directory : Path
        A model folder holding ``epoch-NNN.json`` / ``.safetensors`` / ``_optim.safetensors``.
    keep : int
        How many of the newest checkpoints (by epoch number) stay.
    """
    stems = sorted((int(m.group(1)), p.with_suffix("")) for p in directory.glob("epoch-*.json")
                   if (m := EPOCH_STEM.match(p.stem)))
    for _, stem in stems[:-keep]:
        # Sidecar first: without it the remaining files are no longer a checkpoint.
        for suffix in (".json", ".safetensors"):
            with contextlib.suppress(FileNotFoundError):
                stem.with_suffix(suffix).unlink()
        with contextlib.suppress(FileNotFoundError):
            (stem.parent / f"{stem.name}_optim.safetensors").unlink()
