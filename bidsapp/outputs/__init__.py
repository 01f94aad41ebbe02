"""The output contract: the name and layout of every file roimae writes and reads back.

One package names the derivatives of every level, as fMRIPrep's and XCP-D's ``outputs`` modules
do; the levels (:mod:`bidsapp.pretrain`, :mod:`bidsapp.participant`, :mod:`bidsapp.group`), the
reports (:mod:`bidsapp.reports`) and the Python API (:mod:`bidsapp.api`) build their paths here
and never import each other.

``OUTPUT_DIR`` holds:

- ``models/desc-<m>/``: the pretrained models (:data:`MODELS_DIR`, pretrain level);
- ``sub-<label>/[ses-<label>/]func/``: each run's derivatives (:class:`RunOutputs`, participant
  level; the connectivity baseline of :func:`baseline_outputs` has no ``desc``);
- ``sub-<label>.html`` and ``sub-<label>/figures/``: the participant reports
  (:func:`participant_report`, :func:`participant_figures`);
- ``group/``, ``group/figures/`` and ``group_target-<label>.html``: the group level's tables,
  maps and report (one report per ``--target``)
  (:class:`GroupOutputs`), ``target-<label>_...`` for each ``--target``;
- ``logs/``: each job's log and configuration (:data:`LOGS_DIR`);
- ``.bidsignore``: the patterns of :data:`BIDSIGNORE` (files the BIDS validator does not know).

Its modules: :mod:`~bidsapp.outputs.files` (models, runs, reports), :mod:`~bidsapp.outputs.group`
(the group level's files) and :mod:`~bidsapp.outputs.tables` (the one layout of the tables:
embeddings in columns ``e000``, ``e001``..., region x region ``relmat`` matrices with a ``Node``
column as XCP-D's). Import their names from here.
"""
from bidsapp.outputs.files import (
    ATLAS_SHA256,
    BIDSIGNORE,
    EPOCH_CHECKPOINT,
    EPOCH_STEM,
    FIGURES_DIR,
    GROUP_DIR,
    GROUP_REPORT,
    LOGS_DIR,
    MODEL_SIDECAR,
    MODEL_WEIGHTS,
    MODELS_DIR,
    NOTE_CANNOT_BE_HIDDEN,
    NOTE_HIDDEN_BY_VOXEL,
    PRETRAIN_BIDSIGNORE,
    REPORT_LOCK,
    RunOutputs,
    atlas_label,
    baseline_outputs,
    card_path,
    complete_runs,
    find_model,
    model_descs,
    model_dir,
    participant_figures,
    participant_report,
    recorded_atlas,
    run_figure,
    run_stem,
)
from bidsapp.outputs.group import (
    GroupOutputs,
    set_names,
    target_label,
)
from bidsapp.outputs.tables import (
    EMBEDDING_COLUMNS,
    embedding_columns,
    embedding_frame,
    read_embeddings,
    read_relmat,
    relmat_frame,
)

__all__ = [
    "ATLAS_SHA256",
    "BIDSIGNORE",
    "EMBEDDING_COLUMNS",
    "EPOCH_CHECKPOINT",
    "EPOCH_STEM",
    "FIGURES_DIR",
    "GROUP_DIR",
    "GROUP_REPORT",
    "LOGS_DIR",
    "MODELS_DIR",
    "MODEL_SIDECAR",
    "MODEL_WEIGHTS",
    "NOTE_CANNOT_BE_HIDDEN",
    "NOTE_HIDDEN_BY_VOXEL",
    "PRETRAIN_BIDSIGNORE",
    "REPORT_LOCK",
    "GroupOutputs",
    "RunOutputs",
    "atlas_label",
    "baseline_outputs",
    "card_path",
    "complete_runs",
    "embedding_columns",
    "embedding_frame",
    "find_model",
    "model_descs",
    "model_dir",
    "participant_figures",
    "participant_report",
    "read_embeddings",
    "read_relmat",
    "recorded_atlas",
    "relmat_frame",
    "run_figure",
    "run_stem",
    "set_names",
    "target_label",
]
