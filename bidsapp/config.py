"""The validated run configuration.

The CLI parses arguments into a :class:`Config`; the levels read only this object, and a copy of it
is saved under ``OUTPUT_DIR/logs/`` for every run so that each output can be traced to its settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bidsapp.errors import NoInputError, UsageError
from bidsapp.io import json_text

#: The analysis levels, in the order they run.
AnalysisLevel = Literal["pretrain", "participant", "group"]
LEVELS: tuple[str, ...] = get_args(AnalysisLevel)
#: Masking strategies (:func:`bidsapp.model.masking.build_masking`), the default first: the one
#: list of their names (the CLI's choices, ``--compare``, checkpoints' ``desc`` labels).
MaskingName = Literal["roi", "random", "brain-random", "roi-voxel"]
MASKING_NAMES: tuple[str, ...] = get_args(MaskingName)
#: BIDS ``desc-`` label of each masking: labels are alphanumeric (``brain-random`` -> ``brainrandom``).
MASKING_DESC = {name: name.replace("-", "") for name in MASKING_NAMES}
#: The ``desc`` labels that differ from the names, also accepted where a masking is named.
MASKING_DESCS = tuple(desc for name, desc in MASKING_DESC.items() if desc != name)


def masking_desc(masking: str) -> str:
    """BIDS ``desc-`` label of a masking strategy.

    BIDS labels are alphanumeric, so ``brain-random`` becomes ``brainrandom``.
    """
    return MASKING_DESC.get(masking, masking)


#: Model sizes; ``released`` is the one size of the upstream backbones (swift, neurostorm).
PresetName = Literal["tiny", "small", "base", "released"]
BackboneName = Literal["swin4d", "vit4d", "swift", "neurostorm"]
#: The upstream networks ``roimae import-model`` reads (:mod:`bidsapp.model.upstream`).
UpstreamFamily = Literal["neurostorm", "swift"]
UPSTREAM_FAMILIES: tuple[str, ...] = get_args(UpstreamFamily)
Device = Literal["auto", "cpu", "cuda"]
#: Readouts of a model's outputs for the group level, the default first (docs/science.md).
READOUTS = ("connectivity", "region", "subregion", "inputsubregion", "global")
#: Feature sets that need no model: Pearson FC, tangent-space FC, phenotype covariates.
BASELINES = ("fc", "tangent", "covariates")
Readout = Literal[READOUTS]

#: BIDS labels are alphanumeric (the BIDS specification, "label" value format).
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9]+$")
#: Default output spaces, in order of preference, when ``--space`` is not given.
DEFAULT_SPACES = ("MNI152NLin2009cAsym", "MNI152NLin6Asym")


def check_model_desc(name: str) -> str:
    """The ``desc`` label of an imported model: a BIDS label, not a masking or baseline name.

    Raises
    ------
    UsageError
        Not alphanumeric, or a name the group level's ``--compare`` reads otherwise (exit 64).
    """
    if not LABEL_PATTERN.fullmatch(name):
        raise UsageError(f"--desc {name!r}: a BIDS label holds only letters and digits")
    if name in (*MASKING_NAMES, *MASKING_DESCS, *BASELINES):
        raise UsageError(f"--desc {name!r} is reserved (the maskings roimae pretrains with and the "
                         f"baselines {', '.join(BASELINES)}); choose another name")
    return name


def _strip_prefix(value: str, prefix: str) -> str:
    return value[len(prefix) :] if value.startswith(prefix) else value


def _check_labels(values: list[str] | None, prefix: str, what: str) -> list[str] | None:
    if values is None:
        return None
    labels = [_strip_prefix(v, prefix) for v in values]
    for label in labels:
        if not LABEL_PATTERN.fullmatch(label):
            raise ValueError(
                f"invalid {what} label {label!r}: BIDS labels hold only letters and digits"
            )
    return sorted(set(labels))


class _Section(BaseModel):
    # No option is meaningful at infinity or NaN (--warmup-epochs inf, --lr nan): refused here.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SelectionConfig(_Section):
    """Which runs of the input dataset to use."""

    participant_label: list[str] | None = None
    session_label: list[str] | None = None
    task_label: list[str] | None = None
    space: str | None = None
    bids_filters: dict[str, dict] = Field(default_factory=dict)
    derivatives: dict[str, Path] = Field(default_factory=dict)

    @field_validator("participant_label")
    @classmethod
    def _participants(cls, v: list[str] | None) -> list[str] | None:
        return _check_labels(v, "sub-", "participant")

    @field_validator("session_label")
    @classmethod
    def _sessions(cls, v: list[str] | None) -> list[str] | None:
        return _check_labels(v, "ses-", "session")

    @field_validator("task_label")
    @classmethod
    def _tasks(cls, v: list[str] | None) -> list[str] | None:
        return _check_labels(v, "task-", "task")

    @field_validator("space")
    @classmethod
    def _space(cls, v: str | None) -> str | None:
        if v is not None and not LABEL_PATTERN.fullmatch(v):
            raise ValueError(f"invalid space {v!r}: a template identifier such as MNI152NLin6Asym")
        return v


class PreprocessConfig(_Section):
    """How BOLD runs are brought to the model grid."""

    window_frames: int | None = Field(None, ge=1, le=1024)
    #: Seconds; no fMRI samples faster than 20 Hz, and the bound keeps a typo (1e-6) from asking
    #: for terabytes of frames.
    target_tr: float | None = Field(None, ge=0.05, le=60)

    #: Frames per window when neither the command line nor a checkpoint says otherwise.
    DEFAULT_WINDOW_FRAMES: ClassVar[int] = 20


class ModelConfig(_Section):
    """Which backbone and which size."""

    backbone: BackboneName | None = None
    preset: PresetName | None = None

    #: Backbone and preset used for pretraining when ``--backbone`` / ``--preset`` are not given
    #: (the participant level reads the checkpoint's instead, and refuses options that differ).
    DEFAULT_BACKBONE: ClassVar[BackboneName] = "swin4d"
    DEFAULT_PRESET: ClassVar[PresetName] = "tiny"


class MaskingConfig(_Section):
    """How tokens or voxels are hidden during pretraining."""

    masking: MaskingName = "roi"
    mask_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    mask_ratio_unit: Literal["regions", "tokens"] = "regions"
    mask_time: Literal["tube", "random"] = "tube"


class PretrainConfig(_Section):
    """Optimisation settings of the pretrain level."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    clip_grad: float = Field(1.0, gt=0)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    norm_pix_loss: bool = False
    resume: bool = False
    overwrite: bool = False
    torch_compile: bool = False
    #: bfloat16 autocast on the CPU (CUDA always trains in it); needs a CPU with bf16 instructions.
    cpu_bf16: bool = False
    #: A model to continue pretraining from (its folder or weights; :mod:`bidsapp.origin`).
    init_from: Path | None = None


class ParticipantConfig(_Section):
    """Settings of the participant level."""

    model: Path | None = None
    model_desc: str | None = None
    attribution: bool = True
    attribution_subsets: int = Field(6, ge=2)
    overwrite: bool = False
    reports: bool = True

    @field_validator("attribution_subsets")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"{v} is odd: each random subset of regions is paired with its "
                             "complement, so the number of subsets must be even")
        return v


class GroupConfig(_Section):
    """Settings of the group level."""

    target: str | None = None
    target_map: dict[str, str] = Field(default_factory=dict)
    classifier: Literal["logreg", "svm", "mlp"] = "logreg"
    cv_folds: int = Field(5, ge=2)
    cv_repeats: int = Field(5, ge=1)
    cv_groups: str | None = None
    n_permutations: int = Field(1000, ge=0)
    compare: list[str] | None = None
    features: list[Readout] = Field(default_factory=lambda: [READOUTS[0]], min_length=1)
    covariates: list[str] | None = None

    @field_validator("covariates")
    @classmethod
    def _covariates(cls, v: list[str] | None) -> list[str] | None:
        if v and "participant_id" in v:
            raise ValueError("--covariates participant_id: the id names each participant, it is "
                             "no covariate")
        return list(dict.fromkeys(v)) if v else v   # --covariates age age: one feature

    @field_validator("compare")
    @classmethod
    def _compare(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if name not in MASKING_NAMES and not LABEL_PATTERN.fullmatch(name):
                raise ValueError(f"--compare {name!r}: give models by masking "
                                 f"({', '.join(MASKING_NAMES)}) or desc label (an imported "
                                 f"model's, e.g. neurostorm) and the baselines "
                                 f"{', '.join(BASELINES)}")
        return v


class Config(_Section):
    """Everything one invocation of roimae needs, validated."""

    bids_dir: Path
    output_dir: Path
    analysis_level: AnalysisLevel
    work_dir: Path
    bids_database_dir: Path | None = None
    skip_bids_validation: bool = False
    atlas: Path | None = None
    atlas_labels: Path | None = None
    device: Device = "auto"
    nprocs: int = Field(1, ge=1)
    omp_nthreads: int = Field(1, ge=1)
    random_seed: int = Field(0, ge=0, lt=2**32)
    verbosity: int = Field(0, ge=0)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    participant: ParticipantConfig = Field(default_factory=ParticipantConfig)
    group: GroupConfig = Field(default_factory=GroupConfig)

    @model_validator(mode="after")
    def _atlas_pair(self) -> Config:
        if (self.atlas is None) != (self.atlas_labels is None):
            raise ValueError("--atlas and --atlas-labels must be given together")
        return self

    def to_json(self) -> str:
        """Serialise to JSON (paths as strings), as saved under ``OUTPUT_DIR/logs/``."""
        return json_text(self.model_dump(mode="json"), indent=2, sort_keys=True)


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
