"""The names of the files roimae writes: models, runs, reports (the group level's: :mod:`.group`)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bidsapp.atlas import Atlas
from bidsapp.bids.derivatives import DerivativesWriter, parse_filename
from bidsapp.bids.layout import BoldRun
from bidsapp.config import masking_desc
from bidsapp.errors import NoInputError, UsageError

#: The pretrained models, one folder per masking (``models/desc-<m>/``).
MODELS_DIR = "models"
#: The final model's weights in its folder.
MODEL_WEIGHTS = "model.safetensors"
#: The final model's JSON sidecar (:class:`bidsapp.checkpoint.CheckpointMeta`).
MODEL_SIDECAR = "model.json"
#: The checkpoint of epoch N in a model folder: ``epoch-NNN`` + ``.safetensors``, ``.json`` and
#: ``_optim.safetensors``; newer epochs have larger numbers.
EPOCH_CHECKPOINT = "epoch-{epoch:03d}"
EPOCH_STEM = re.compile(r"^epoch-(\d{3,})$")
#: Each job's log file and configuration.
LOGS_DIR = "logs"
#: The group level's tables and maps.
GROUP_DIR = "group"
#: The group report, beside :data:`GROUP_DIR`.
#: The group report of ``--target`` LABEL is ``group_target-<label>.html``.
GROUP_REPORT = "group_{prefix}.html"
#: The figures of a report, in ``sub-<label>/`` or :data:`GROUP_DIR`.
FIGURES_DIR = "figures"
#: The lock of a participant report, in its figures folder.
REPORT_LOCK = ".report.lock"

#: The ``note`` of a region in a participant's attribution table that has no brain voxel on the
#: model's working grid (its values are ``n/a``).
NOTE_CANNOT_BE_HIDDEN = "no brain voxel on the model's working grid: cannot be hidden"
#: The ``note`` of a region too small to own a token: hidden voxel by voxel, a finer occlusion than
#: the token-owning regions'.
NOTE_HIDDEN_BY_VOXEL = "owns no token of the model grid: hidden voxel by voxel"

#: Non-standard suffixes and folders the participant and group levels write (kept out of the
#: BIDS validator's way). Directories without a trailing slash: bids-validator-deno does not
#: match "dir/" patterns.
BIDSIGNORE = ["*_embedding.tsv", "*_embedding.json", "*_boldmap.nii.gz", "*_boldmap.json",
              "*_attribution.tsv", "*_attribution.json", "*_relmat.tsv", "*_relmat.json",
              "*_timeseries.tsv", "*_timeseries.json", f"sub-*/{FIGURES_DIR}", "sub-*.html",
              MODELS_DIR, GROUP_DIR, GROUP_REPORT.format(prefix="*"), LOGS_DIR]

#: What the pretrain level adds to ``.bidsignore``.
PRETRAIN_BIDSIGNORE = [MODELS_DIR, LOGS_DIR]

#: Where the run embeddings of every model lie: their ``desc`` names the models found.
_RUN_EMBEDDINGS = "sub-*/**/*_stat-mean_embedding.tsv"


def model_dir(output_dir: Path, desc: str) -> Path:
    """``OUTPUT_DIR/models/desc-<m>``: the models pretrained with one masking.

    Parameters
    ----------
    output_dir : Path
    desc : str
        The masking's ``desc`` label (:func:`bidsapp.checkpoint.masking_desc`).

    Returns
    -------
    Path
    """
    return output_dir / MODELS_DIR / f"desc-{desc}"


def card_path(weights: Path) -> Path:
    """The Markdown model card of a checkpoint (``model.safetensors`` -> ``model.md``)."""
    return Path(weights).with_suffix(".md")


def find_model(output_dir: Path, masking: str | None = None) -> Path:
    """The weights of the model the pretrain level wrote in ``output_dir``.

    Parameters
    ----------
    output_dir : Path
    masking : str, optional
        The masking (or its ``desc`` label, or an imported model's ``desc``) of the model to take;
        needed when there are several.

    Returns
    -------
    Path
        ``OUTPUT_DIR/models/desc-<m>/model.safetensors``.

    Raises
    ------
    bidsapp.errors.NoInputError
        No such model (66).
    bidsapp.errors.UsageError
        Several models and no ``masking`` (64).
    """
    models = output_dir / MODELS_DIR
    found = sorted(models.glob(f"desc-*/{MODEL_SIDECAR}")) if models.is_dir() else []
    if masking is not None:
        found = [p for p in found if p.parent.name == f"desc-{masking_desc(masking)}"]
        if not found:
            raise NoInputError(f"no model desc-{masking_desc(masking)} in {models} (run the pretrain "
                               f"level with --masking {masking}, import one with roimae "
                               "import-model --desc, or pass --model)")
    if not found:
        raise NoInputError(f"no pretrained model in {models}: run `roimae BIDS_DIR OUTPUT_DIR "
                           "pretrain` first, or pass --model CHECKPOINT.safetensors")
    if len(found) > 1:
        descs = ", ".join(p.parent.name.removeprefix("desc-") for p in found)
        raise UsageError(f"several pretrained models in {models} ({descs}); choose one with "
                         "--model-desc")
    return found[0].parent / MODEL_WEIGHTS


def atlas_label(atlas: Atlas) -> str:
    """The ``atlas-`` entity of an atlas's outputs: the ASCII letters and digits of its name.

    Parameters
    ----------
    atlas : bidsapp.atlas.Atlas

    Returns
    -------
    str
        E.g. ``AAL3v1``.
    """
    return "".join(ch for ch in atlas.name if ch.isalnum())


def baseline_outputs(writer: DerivativesWriter, run: BoldRun | Mapping[str, str],
                     atlas_label: str) -> tuple[Path, Path]:
    """The region time series and correlation matrix of the connectivity baseline of one run.

    They do not depend on the model, so their names have no ``desc``.

    Parameters
    ----------
    writer : bidsapp.bids.derivatives.DerivativesWriter
        The writer of OUTPUT_DIR.
    run : bidsapp.bids.layout.BoldRun or mapping
        The input run, or its entities.
    atlas_label : str
        The ``atlas-`` entity (:func:`atlas_label`).

    Returns
    -------
    timeseries, relmat : Path
        ``<source>_atlas-<a>_stat-mean_timeseries.tsv`` and
        ``<source>_atlas-<a>_stat-pearsoncorrelation_relmat.tsv``.
    """
    entities = run if isinstance(run, Mapping) else run.entities

    def path(suffix: str, stat: str) -> Path:
        return writer.path_for(entities, suffix=suffix, extension=".tsv", atlas=atlas_label,
                               stat=stat)

    return path("timeseries", "mean"), path("relmat", "pearsoncorrelation")


class RunOutputs:
    """The paths of one run's participant-level outputs, and the test of their completeness.

    Parameters
    ----------
    writer : bidsapp.bids.derivatives.DerivativesWriter
        The writer of OUTPUT_DIR.
    run : bidsapp.bids.layout.BoldRun or mapping
        The input run, or its entities.
    desc : str
        The model's masking (``desc-<m>``).
    atlas_label : str
        The ``atlas-`` entity (:func:`atlas_label`).
    groups : bool
        Whether the atlas has region groups (then the run has a ``stat-bygroup`` table).

    Attributes
    ----------
    embedding, mean_embedding, region_embedding : Path
        The window embeddings, the run embedding and the region embeddings.
    subregion, input_subregion : Path
        The within-region dispersion of the token features (the ``subregion`` readout), and of
        the model's input averaged per token (the ``inputsubregion`` reference).
    connectivity : Path
        The model's feature-space connectivity.
    timeseries, fc : Path
        The connectivity baseline (:func:`baseline_outputs`).
    occluded, recon_map, occlusion_map, table : Path
        The attribution: occluded embeddings, the two region maps and the region table.
    groups : Path or None
        The attribution by region group (None for an atlas without groups).
    done : Path
        The completion sidecar (of :attr:`embedding`), written last.
    """

    def __init__(self, writer: DerivativesWriter, run: BoldRun | Mapping[str, str], desc: str,
                 atlas_label: str, groups: bool = True) -> None:
        entities = run if isinstance(run, Mapping) else run.entities

        def path(suffix: str, extension: str, **extra: str) -> Path:
            return writer.path_for(entities, suffix=suffix, extension=extension, **extra)

        self.embedding = path("embedding", ".tsv", desc=desc)
        self.mean_embedding = path("embedding", ".tsv", desc=desc, stat="mean")
        self.region_embedding = path("embedding", ".tsv", atlas=atlas_label, desc=desc,
                                     stat="region")
        self.subregion = path("embedding", ".tsv", atlas=atlas_label, desc=desc, stat="subregion")
        self.input_subregion = path("embedding", ".tsv", atlas=atlas_label, desc=desc,
                                    stat="inputsubregion")
        self.connectivity = path("relmat", ".tsv", atlas=atlas_label, desc=desc,
                                 stat="pearsoncorrelation")
        self.timeseries, self.fc = baseline_outputs(writer, entities, atlas_label)
        self.occluded = path("embedding", ".tsv", atlas=atlas_label, desc=desc, stat="occluded")
        self.recon_map = path("boldmap", ".nii.gz", atlas=atlas_label, stat="reconerror", desc=desc)
        self.occlusion_map = path("boldmap", ".nii.gz", atlas=atlas_label, stat="occlusion",
                                  desc=desc)
        self.table = path("attribution", ".tsv", atlas=atlas_label, desc=desc)
        # The summary by region group exists only for atlases whose regions have groups.
        self.groups = (path("attribution", ".tsv", atlas=atlas_label, desc=desc, stat="bygroup")
                       if groups else None)
        self.done = self.embedding.with_suffix(".json")

    def data_files(self, attribution: bool) -> list[Path]:
        """The data files of the run (not their sidecars), with or without the attribution.

        Parameters
        ----------
        attribution : bool

        Returns
        -------
        list of Path
        """
        files = [self.embedding, self.mean_embedding, self.region_embedding, self.subregion,
                 self.input_subregion, self.connectivity, self.timeseries, self.fc]
        if attribution:
            files += [self.occluded, self.recon_map, self.occlusion_map, self.table, self.groups]
        return [f for f in files if f is not None]

    def completion(self) -> dict[str, Any] | None:
        """The completion sidecar if the run is complete (by whichever model), else ``None``.

        Complete: the sidecar (written last) parses and every data file it lists (``Outputs``)
        exists; a sidecar of roimae 0.1, which lists none, implies the embeddings and, with
        attribution, its files. The one test of completeness, for the reports and the group
        level.
        """
        try:
            meta = json.loads(self.done.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(meta, dict) or not isinstance(meta.get("Model"), dict):
            return None
        listed = meta.get("Outputs")
        if isinstance(listed, list) and all(isinstance(name, str) and name == Path(name).name
                                            and name not in ("", ".", "..") for name in listed):
            files = [self.done.parent / name for name in listed]
        elif listed is None:
            files = [self.embedding, self.mean_embedding]
            if meta.get("Attribution") is not None:
                files += [self.occluded, self.recon_map, self.occlusion_map, self.table]
        else:
            return None
        return meta if all(p.is_file() for p in files) else None

    def is_complete(self, attribution: bool, model_sha256: str) -> bool:
        """Complete, by this model, with every output this version writes (else it is redone).

        Parameters
        ----------
        attribution : bool
            Whether this job attributes (a run complete without attribution is then redone).
        model_sha256 : str
            The hash of this job's model weights.

        Returns
        -------
        bool
        """
        meta = self.completion()
        if meta is None:
            return False
        same_model = meta["Model"].get("SHA256") == model_sha256
        return (same_model and (meta.get("Attribution") is not None or not attribution)
                and all(p.is_file() for p in self.data_files(meta.get("Attribution") is not None)))


def complete_runs(writer: DerivativesWriter, subject: str, atlas_label: str,
                  groups: bool = True) -> list[tuple[str, str, RunOutputs, dict[str, Any]]]:
    """Every complete run of ``subject`` in OUTPUT_DIR, whichever model and job wrote it.

    Parameters
    ----------
    writer : bidsapp.bids.derivatives.DerivativesWriter
        The writer of OUTPUT_DIR.
    subject : str
        The participant label, without ``sub-``.
    atlas_label, groups : str, bool
        As for :class:`RunOutputs`.

    Returns
    -------
    list of (str, str, RunOutputs, dict)
        ``(run name, desc, outputs, completion sidecar)`` sorted by desc and run: what the
        participant report shows, so that it never loses the runs of another model or job.
    """
    folder = writer.output_dir / f"sub-{subject}"
    found = []
    for done in sorted(folder.rglob("*_embedding.json")) if folder.is_dir() else []:
        try:
            entities, _, _ = parse_filename(done.name)
        except UsageError:
            continue
        desc = entities.pop("desc", None)
        if desc is None or "stat" in entities or "atlas" in entities:
            continue   # not a completion sidecar (the run embedding's own sidecar, say)
        # Each run under the atlas label its own outputs carry (another model of this output
        # folder may have used another atlas).
        label, has_groups = _run_atlas(done, atlas_label, groups)
        out = RunOutputs(writer, entities, desc, label, groups=has_groups)
        meta = out.completion() if out.done == done else None
        if meta is not None:
            name = "_".join(f"{key}-{value}" for key, value in entities.items())
            found.append((name, desc, out, meta))
    return sorted(found, key=lambda item: (item[1], item[0]))


def _run_atlas(done: Path, atlas_label: str, groups: bool) -> tuple[str, bool]:
    """The ``atlas-`` label of a run's listed outputs, and whether they have a by-group table.

    ``atlas_label`` and ``groups`` when the completion sidecar does not tell (roimae 0.1).
    """
    try:
        listed = json.loads(done.read_text(encoding="utf-8")).get("Outputs")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        listed = None
    names = [n for n in listed if isinstance(n, str)] if isinstance(listed, list) else []
    labels = set()
    for name in names:
        with contextlib.suppress(UsageError):
            labels.add(parse_filename(name)[0].get("atlas"))
    labels.discard(None)
    if len(labels) != 1:
        return atlas_label, groups
    attributed = any(name.endswith("_attribution.tsv") for name in names)
    return labels.pop(), any("_stat-bygroup_" in n for n in names) if attributed else groups


#: The sidecar key of the atlas (SHA-256) that a run's outputs were computed with.
ATLAS_SHA256 = "AtlasSHA256"


def recorded_atlas(sidecar: Path | Mapping[str, Any]) -> str | None:
    """The atlas hash a sidecar (a path or its content) records; None when it records none.

    Sidecars of roimae 0.1, and unreadable ones, record none: their outputs are taken as they are.
    """
    if isinstance(sidecar, Path):
        try:
            sidecar = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
    found = sidecar.get(ATLAS_SHA256) if isinstance(sidecar, Mapping) else None
    return found if isinstance(found, str) else None


def model_descs(output_dir: Path) -> list[str]:
    """The ``desc`` of every model with run embeddings in ``output_dir``, sorted.

    Parameters
    ----------
    output_dir : Path

    Returns
    -------
    list of str
    """
    return sorted({p.name.split("_desc-")[1].split("_")[0]
                   for p in output_dir.glob(_RUN_EMBEDDINGS)})


def run_stem(run_name: str, desc: str) -> str:
    """The stem of a run's report figures: ``<run name>_desc-<m>``.

    Parameters
    ----------
    run_name : str
        The run's entities, ``sub-01_task-rest_...``.
    desc : str
        The model's masking.

    Returns
    -------
    str
    """
    return f"{run_name}_desc-{desc}"


def participant_report(output_dir: Path, subject: str) -> Path:
    """``OUTPUT_DIR/sub-<label>.html``.

    Parameters
    ----------
    output_dir : Path
    subject : str
        The participant label, without ``sub-``.

    Returns
    -------
    Path
    """
    return output_dir / f"sub-{subject}.html"


def participant_figures(output_dir: Path, subject: str) -> Path:
    """``OUTPUT_DIR/sub-<label>/figures``: the participant report's figures.

    Parameters
    ----------
    output_dir : Path
    subject : str
        The participant label, without ``sub-``.

    Returns
    -------
    Path
    """
    return output_dir / f"sub-{subject}" / FIGURES_DIR


def run_figure(figures: Path, stem: str, key: str) -> Path:
    """One figure of a run in a participant report: ``<stem>_<key>.png``.

    Parameters
    ----------
    figures : Path
        :func:`participant_figures`.
    stem : str
        :func:`run_stem`.
    key : str
        ``reconerror``, ``occlusion``, ``topregions``, ``bestrecon`` or ``reconstruction``.

    Returns
    -------
    Path
    """
    return figures / f"{stem}_{key}.png"
