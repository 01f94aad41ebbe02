"""Feature sets for the group level: each model's readouts, the baselines, covariates, targets.

Each model (``desc``) is read through one or more readouts (``--features``): the feature-space
connectivity of its regions (``connectivity``, the Fisher z of the upper triangle), its region
embeddings (``region``) or the run embedding (``global``); see :mod:`bidsapp.readouts`. Three
baselines are read for the same runs: ``fc``, the Fisher z of the Pearson correlations of the
region mean signals of the same preprocessed runs; ``tangent``, their region time series, which
the classifier's first step turns into the tangent-space parametrisation of their covariances
(Varoquaux et al. 2010; the strongest FC readout for classification in Dadi et al. 2019); and
``covariates``, the phenotype columns of ``--covariates`` alone (the "no imaging" floor).

Only complete runs count (their completion sidecar, written last, lists every output), and every
run of a model's set must come from the same model (by weight hash).
"""


from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from nilearn.connectome import ConnectivityMeasure

from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.checkpoint import read_metadata
from bidsapp.config import BASELINES, Config, masking_desc
from bidsapp.errors import BadDataError, NoInputError, RoimaeError, UsageError
from bidsapp.logs import get_logger
from bidsapp.outputs import (
    MODEL_SIDECAR,
    RunOutputs,
    baseline_outputs,
    model_descs,
    model_dir,
    read_embeddings,
    read_relmat,
    recorded_atlas,
    set_names,
)
from bidsapp.readouts import edge_regions, vectorize
from bidsapp.results import RunEmbedding

log = get_logger("group")


@dataclass
class EmbeddingSet:
    """The features of one feature set, with each run's participant, label and group.

    Attributes
    ----------
    name : str
        How tables and the report name the set: ``<desc>-<readout>`` for a model, else the
        baseline's name.
    stem : str
        Its part of file names: ``desc-<desc>_feature-<readout>`` or ``feature-<baseline>``.
    desc : str or None
        The model's masking description; None for a baseline.
    readout : str
        One of :data:`bidsapp.config.READOUTS` or :data:`BASELINES`.
    runs : pandas.DataFrame
        ``run, participant_id, target, cv_group, table, occluded``, one row per run.
    X : ndarray, shape (n_runs, F) or (n_runs,)
        The features; for ``tangent``, an object array of each run's region time series
        (n_frames, R'), which the classifier's first step turns into features.
    regions : list of ndarray or None
        For each atlas region, the columns of ``X`` that involve it (None: no such mapping).
    model_sha256 : str or None
        The one model every run's features come from (None for a baseline).
    """

    name: str
    stem: str
    desc: str | None
    readout: str
    runs: pd.DataFrame
    X: np.ndarray
    regions: list[np.ndarray] | None = None
    model_sha256: str | None = None

    @property
    def is_baseline(self) -> bool:
        """A set that needs no model."""
        return self.desc is None

    @property
    def from_time_series(self) -> bool:
        """``X`` holds time series: the features are fit inside the folds (``tangent``)."""
        return self.readout == "tangent"

    @property
    def n_features(self) -> int:
        """The number of features the classifier sees."""
        if self.from_time_series:
            n_regions = self.X[0].shape[1]
            return n_regions * (n_regions - 1) // 2
        return self.X.shape[1]

    def feature_matrix(self) -> np.ndarray:
        """The features of every run, (n_runs, F).

        For ``tangent``, with the reference fit on all runs: descriptive only (the effective
        rank); the classifier fits its own on the training folds.
        """
        if self.from_time_series:
            return tangent_space().fit_transform(list(self.X))
        return self.X


def tangent_space() -> ConnectivityMeasure:
    """The tangent-space FC step: region time series (n_frames, R) -> R (R - 1) / 2 features.

    nilearn's defaults otherwise: Ledoit-Wolf covariances of the standardised time series, the
    geometric mean of the fitted runs' covariances as the reference.
    """
    return ConnectivityMeasure(kind="tangent", vectorize=True, discard_diagonal=True)


# --- The readouts: one place maps a readout name to its features --------------------------------

#: What kind of group difference each feature set can see, and what it is blind to (the group
#: report shows it beside the scores, so that "fc wins" is not read as more than it is).
WHAT_IT_SEES: dict[str, tuple[str, str]] = {
    "global": ("first-order: a shift of the whole window embedding (mean over tokens and frames)",
               "differences between regions and frames, and covariance, average out"),
    "region": ("first-order, per region: each region's mean token features over frames",
               "covariance between regions or frames"),
    "connectivity": ("between-region covariance, in the model's feature space",
                     "a first-order shift that leaves correlations unchanged"),
    "subregion": ("within-region structure: how far each region's tokens move apart over frames "
                  "(parts of a region that follow different courses)",
                  "regions under two effective tokens of the model's grid; covariance between "
                  "regions"),
    "inputsubregion": ("the subregion statistic of the model's input averaged per token, no "
                       "features: what within-region structure shows without the model",
                       "what the model's features add; covariance between regions"),
    "fc": ("between-region covariance of region mean signals (Pearson)",
           "anything inside a region that leaves its mean signal unchanged; first-order shifts"),
    "tangent": ("between-region covariance of region mean signals (tangent space)",
                "anything inside a region that leaves its mean signal unchanged; first-order shifts"),
    "covariates": ("the phenotype columns alone: the no-imaging floor", "the images"),
}


#: Readouts with a block of columns per region (regions x channels, flattened).
PER_REGION = ("region", "subregion", "inputsubregion")


def run_features(readout: str, run: RunEmbedding) -> np.ndarray:
    """The features of one analysed run for a model readout, as :func:`read_features` reads them.

    Parameters
    ----------
    readout : {"global", "region", "subregion", "inputsubregion", "connectivity"}
    run : bidsapp.results.RunEmbedding

    Returns
    -------
    numpy.ndarray, shape (F,)
        The run embedding; the region embeddings or the within-region dispersions, region by
        region; or the Fisher z of the upper triangle of the feature-space connectivity.
    """
    if readout == "global":
        return run.embedding
    if readout == "region":
        return run.result.region_embeddings.ravel()
    if readout == "subregion":
        return run.result.subregion.ravel()
    if readout == "inputsubregion":
        return run.result.input_subregion.ravel()
    return vectorize(run.result.feature_connectivity)


def readout_file(out: RunOutputs, readout: str) -> Path:
    """The participant-level file that holds a model readout of one run."""
    return {"global": out.mean_embedding, "region": out.region_embedding,
            "subregion": out.subregion, "inputsubregion": out.input_subregion,
            "connectivity": out.connectivity}[readout]


def feature_names(readout: str, region_names: list[str], n_features: int) -> list[str]:
    """Names of the features of a model readout (``roimae_`` prefix, as scikit-learn expects).

    ``roimae_e000``... (global), ``roimae_<region>_e000``... (region),
    ``roimae_<region>_subregion_e000``... (subregion), ``roimae_<region>_inputsubregion_e000``
    (inputsubregion), ``roimae_<region>__<region>`` (connectivity); ``n_features`` is the
    readout's width.
    """
    if readout == "global":
        return [f"roimae_e{i:03d}" for i in range(n_features)]
    if readout in PER_REGION:
        width = n_features // len(region_names)
        kind = "" if readout == "region" else f"_{readout}"
        return [f"roimae_{name}{kind}_e{i:03d}" for name in region_names for i in range(width)]
    first, second = edge_regions(len(region_names))
    return [f"roimae_{region_names[a]}__{region_names[b]}" for a, b in zip(first, second, strict=True)]


def read_features(readout: str, path: Path) -> np.ndarray | None:
    """The feature vector of one run for a readout, None when its file is missing.

    For ``tangent``, the run's region time series (n_frames, R).
    """
    if not path.is_file():
        return None
    if readout in ("connectivity", "fc"):
        return vectorize(read_relmat(path))
    if readout == "tangent":
        return pd.read_csv(path, sep="\t", na_values="n/a").to_numpy(dtype=np.float64)
    return read_embeddings(path).ravel()


def time_series_set(vectors: list[np.ndarray], n_regions: int
                     ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Time series of the regions with signal in every run, and each atlas region's features.

    A covariance needs every region in every run: regions without voxels or constant in any run
    are left out (this looks at the data only, never the labels). Returns the object array of
    time series (n_runs,) and, per atlas region, its columns among the tangent features (none
    for a region left out).
    """
    usable = np.ones(n_regions, dtype=bool)
    for ts in vectors:
        usable &= np.isfinite(ts).all(axis=0) & (np.nanstd(ts, axis=0) > 0)
    kept = np.flatnonzero(usable)
    if len(kept) < 2:
        raise BadDataError("fewer than two regions have a signal in every run: the tangent "
                           "baseline cannot be computed")
    X = np.empty(len(vectors), dtype=object)
    X[:] = [ts[:, kept] for ts in vectors]
    by_kept = feature_regions("connectivity", len(kept), 0)
    regions = [np.array([], dtype=np.int64)] * n_regions
    for j, r in enumerate(kept):
        regions[r] = by_kept[j]
    return X, regions


def feature_regions(readout: str, n_regions: int, n_features: int) -> list[np.ndarray] | None:
    """For each region, the feature columns that involve it (None for the run embedding)."""
    if readout in ("connectivity", "fc"):
        first, second = edge_regions(n_regions)
        return [np.flatnonzero((first == r) | (second == r)) for r in range(n_regions)]
    if readout in PER_REGION:
        width = n_features // n_regions
        return [np.arange(r * width, (r + 1) * width) for r in range(n_regions)]
    return None


def load_feature_set(desc: str | None, readout: str, dataset, writer: DerivativesWriter,
                     targets: pd.Series, cv_groups: pd.Series | None, atlas_label: str,
                     n_regions: int, groups: bool = True,
                     atlas_sha256: str | None = None) -> EmbeddingSet:
    """The runs of one model (or the FC baseline, ``desc=None``) through one readout.

    Only complete runs count (their completion sidecar, written last, lists every output), and
    every run of a model's set must come from the same model (by weight hash).
    """
    rows, vectors, missing, stale, without = [], [], 0, 0, 0
    models: dict[str, list[str]] = {}
    current = None if desc is None else current_model(writer.output_dir, desc)
    for run in dataset.runs:
        pid = f"sub-{run.subject}"
        if pid not in targets.index:
            continue
        out, attributed = None, False
        if desc is None:
            timeseries, relmat = baseline_outputs(writer, run, atlas_label)
            path = timeseries if readout == "tangent" else relmat
        else:
            out = RunOutputs(writer, run, desc, atlas_label, groups=groups)
            # A participant job killed part-way leaves files but no completion sidecar.
            meta = out.completion()
            if meta is None:
                missing += 1
                continue
            if current is not None and meta["Model"].get("SHA256") != current:
                stale += 1
                continue
            models.setdefault(str(meta["Model"].get("SHA256")), []).append(run.name)
            # The sidecar, not the files' presence, says whether attribution ran: files of an
            # earlier run with attribution may remain beside a rerun with --no-attribution.
            attributed = meta.get("Attribution") is not None
            path = readout_file(out, readout)
        vec = read_features(readout, path)
        if vec is None:
            # A complete run without this readout's file: written by an earlier roimae.
            without += out is not None
            missing += out is None
            continue
        check_atlas(meta if desc is not None else path.with_suffix(".json"), atlas_sha256, path)
        # NaN is a missing feature (a region without signal; imputed in the folds), but a run
        # embedding must be finite and nothing may be infinite.
        if np.isinf(vec).any() or (readout == "global" and not np.isfinite(vec).all()):
            raise BadDataError(f"{path.name} holds non-finite values; rerun the participant "
                               "level for it (--overwrite) with a sound model")
        occluded = None
        if attributed and readout == "global":
            occluded = read_embeddings(out.occluded)
        vectors.append(vec)
        rows.append({"run": run.name, "participant_id": pid, "target": targets[pid],
                     "cv_group": pid if cv_groups is None else str(cv_groups.get(pid)),
                     "table": out.table if attributed else None, "occluded": occluded})
    name, stem = set_names(desc, readout)
    if missing:
        log.warning("%s: %d selected runs have no complete %s features (participant level not "
                    "run for them, or its job was killed before the end); they are left out",
                    name, missing, readout)
    if without:
        log.warning("%s: %d complete runs have no %s file (written by an earlier roimae "
                    "without this readout); they are left out: rerun the participant level for "
                    "them with --overwrite", name, without, readout)
    if stale:
        log.warning("%s: %d runs hold the features of an earlier desc-%s model, not of "
                    "models/desc-%s (%s...; pretrained again with --overwrite?); they are left "
                    "out: rerun the participant level for them", name, stale, desc, desc,
                    current[:12])
    if not rows and without and not stale:
        raise NoInputError(f"no desc-{desc} run has {readout} features (written by an earlier "
                           "roimae without this readout): rerun the participant level with "
                           "--overwrite")
    if not rows and stale:
        raise NoInputError(f"every desc-{desc} run holds the features of a model that "
                           f"models/desc-{desc} no longer holds ({current[:12]}...): rerun the "
                           "participant level with it (--overwrite)")
    if not rows:
        what = f"desc-{desc} {readout}" if desc else "functional-connectivity"
        raise NoInputError(f"no {what} features found in the output directory: run the "
                           "participant level first" + (f" with the desc-{desc} model" if desc
                                                        else ""))
    if desc is not None:
        check_one_model(desc, models)
    if len({v.shape[-1] if readout == "tangent" else len(v) for v in vectors}) > 1:
        raise BadDataError(f"{name}: the runs' feature files have different sizes (outputs of "
                           "different atlases under one name?)")
    if readout == "tangent":
        X, regions = time_series_set(vectors, n_regions)
    else:
        X = np.vstack(vectors)
        regions = feature_regions(readout, n_regions, X.shape[1])
        if regions is not None:
            # A region without a value in any run (no token of its own, too few for a
            # dispersion) cannot be hidden from the classifier: no importance, not zero.
            regions = [c if np.isfinite(X[:, c]).any() else c[:0] for c in regions]
    return EmbeddingSet(name, stem, desc, readout, pd.DataFrame(rows), X, regions,
                        next(iter(models)) if models else None)


def check_atlas(sidecar: dict | Path, atlas_sha256: str | None, path: Path) -> None:
    """Refuse (65) features written with another atlas than the group level's (same label).

    ``sidecar``: the run's completion sidecar, or the path of a baseline file's sidecar
    (:func:`~bidsapp.outputs.recorded_atlas`).
    """
    found = None if atlas_sha256 is None else recorded_atlas(sidecar)
    if found not in (None, atlas_sha256):
        raise BadDataError(f"{path.name} was written with another atlas ({found[:12]}...) "
                           f"than this one ({atlas_sha256[:12]}...) of the same label: pass the "
                           "atlas the participant level used (--atlas)")


def current_model(output_dir: Path, desc: str) -> str | None:
    """The weight hash of ``OUTPUT_DIR/models/desc-<desc>``, None when there is no such model.

    Runs whose features came from another model of that masking (one since replaced by
    ``pretrain --overwrite``) are not this model's features.
    """
    sidecar = model_dir(output_dir, desc) / MODEL_SIDECAR
    if not sidecar.is_file():
        return None
    try:
        return read_metadata(sidecar).weights_sha256
    except RoimaeError:
        return None


def check_one_model(desc: str, models: dict[str, list[str]]) -> None:
    """Refuse (65) embeddings of one desc that come from several models (by weight hash).

    Two pretrainings of one masking (a rerun with --overwrite, a --model from elsewhere) give
    embeddings in unrelated spaces, or of other widths: classifying them together is meaningless.
    """
    if len(models) <= 1:
        return
    listing = "; ".join(
        f"model {sha[:12]}: {len(runs)} runs ({', '.join(runs[:2])}{', ...' if len(runs) > 2 else ''})"
        for sha, runs in sorted(models.items(), key=lambda item: -len(item[1])))
    raise BadDataError(f"the desc-{desc} embeddings come from {len(models)} different models "
                       f"({listing}); rerun the participant level with one model for every "
                       "run (--overwrite)")


def wanted_sets(config: Config) -> list[tuple[str | None, str]]:
    """``(desc, readout)`` of every feature set to score; ``desc`` None for a baseline.

    Without ``--compare``: every model found (or ``--model-desc``), ``fc`` and, with
    ``--covariates``, ``covariates``.
    """
    names = config.group.compare
    if names is None:
        if config.participant.model_desc:
            names = [config.participant.model_desc]
        else:
            names = model_descs(config.output_dir)
            if not names:
                raise NoInputError(f"no embeddings in {config.output_dir}: run the participant "
                                   "level first")
        names = [*names, "fc", "tangent"] + (["covariates"] if config.group.covariates else [])
    wanted: list[tuple[str | None, str]] = []
    for name in names:
        if name in BASELINES:
            if name == "covariates" and not config.group.covariates:
                raise UsageError("--compare covariates needs --covariates COLUMN [COLUMN ...]")
            wanted.append((None, name))
        else:
            wanted += [(masking_desc(name), readout) for readout in config.group.features]
    return list(dict.fromkeys(wanted))


def check_classes(es: EmbeddingSet, folds: int) -> np.ndarray:
    """The target's classes among the set's participants; 65 unless each fills every fold."""
    per_participant = es.runs.drop_duplicates("participant_id")["target"].value_counts()
    if len(per_participant) < 2:
        raise BadDataError(f"the target has a single class ({per_participant.index[0]!r}) among "
                           "the participants with embeddings; classification needs two or more")
    if per_participant.min() < folds:
        raise BadDataError(
            f"too few participants for {folds}-fold cross-validation: class "
            f"{per_participant.idxmin()!r} has {per_participant.min()} participants (lower "
            "--cv-folds or add participants)")
    return np.array(sorted(per_participant.index))


def regions_note(es: EmbeddingSet) -> str | None:
    """Why region importance cannot be computed for ``es`` (runs without attribution), if so.

    Only the run embedding needs the participant level's attribution (its occluded embeddings);
    region and connectivity features are hidden from the classifier directly.
    """
    if es.readout != "global":
        return None
    without = int(sum(o is None for o in es.runs["occluded"]))
    if without == 0:
        return None
    runs = ("no run has" if without == len(es.runs)
            else f"{without} of {len(es.runs)} runs have no")
    return (f"region importance not computed for {es.name}: {runs} region attribution "
            "(the participant level ran with --no-attribution); rerun it without "
            "--no-attribution (and with --overwrite) for the region maps")
