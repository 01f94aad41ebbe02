"""The ``group`` level: classify participants from their embeddings, compare maskings, map regions.

Cross-validation is honest by construction:

- folds are drawn by :class:`~sklearn.model_selection.StratifiedGroupKFold` with the participant as the
  group (all runs of one participant stay in one fold) or, with ``--cv-groups COLUMN``, that column
  (e.g. site: a site is never in training and test at once); repeated ``--cv-repeats`` times;
- the regularisation is chosen by an inner grouped cross-validation on the training folds only;
- the label-permutation p-value permutes diagnoses between participants (never between runs of one
  participant) and re-runs the same folds: ``p = (1 + #{null >= observed}) / (1 + n_permutations)``. For
  speed the null refits the classifier at the regularisation chosen most often on the real labels;
- ``--compare A B`` scores every embedding set on the very same folds and tests the fold-wise difference
  of balanced accuracy with the corrected resampled t-test (Nadeau & Bengio 2003), which accounts for the
  overlap of training sets between folds.

Feature sets. Each model (``desc``) is read through one or more readouts (``--features``): the
feature-space connectivity of its regions (``connectivity``, the Fisher z of the upper triangle),
its region embeddings (``region``) or the run embedding (``global``); see :mod:`bidsapp.readouts`.
Three baselines are scored on the same folds: ``fc``, the Fisher z of the Pearson correlations of
the region mean signals of the same preprocessed runs; ``tangent``, the tangent-space
parametrisation of their covariances (Varoquaux et al. 2010; the strongest FC readout for
classification in Dadi et al. 2019), whose reference (the geometric mean of the training runs'
covariances) nilearn's ``ConnectivityMeasure`` fits on the training folds only, as the first step
of the pipeline; and ``covariates``, the phenotype columns of ``--covariates`` alone (the "no
imaging" floor). Every classifier is one scikit-learn pipeline fit on
the training folds only: mean imputation, standardisation and a PCA that keeps every component (a
rotation onto the training rows' span, exact for an L2-penalised linear model, and what makes 10^4
connectivity features cheap), then the classifier.

Region importance for the decision: for each test participant and region r, the drop in the
cross-validated decision margin toward the participant's true class when r is hidden from the
classifier: for the run embedding, by the occluded embedding the participant level kept for r; for
region and connectivity features, by replacing every feature that involves r with its training mean
(regions the features need to be classified correctly score high; regions whose occlusion moves
every participant alike average out).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from joblib import Memory
from nilearn.connectome import ConnectivityMeasure
from scipy import stats
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from sklearn.model_selection import (
    GridSearchCV,
    GroupKFold,
    LeaveOneGroupOut,
    StratifiedGroupKFold,
)
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from bidsapp.atlas import Atlas, group_summary, load_atlas, region_map, region_voxels
from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.bids.layout import discover_runs, runs_without_row
from bidsapp.checkpoint import masking_desc
from bidsapp.config import BASELINES, Config
from bidsapp.errors import BadDataError, NoInputError, UsageError
from bidsapp.io import (
    atomic_write_json,
    ensure_dir,
    remove_stale_temporaries,
    remove_temporaries,
)
from bidsapp.logs import get_logger
from bidsapp.outputs import (
    BIDSIGNORE,
    GroupOutputs,
    RunOutputs,
    SetResult,
    atlas_label,
    baseline_outputs,
    model_descs,
    read_embeddings,
    read_relmat,
    set_names,
)
from bidsapp.readouts import edge_regions, vectorize
from bidsapp.reports import write_group_report

log = get_logger("group")

METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro")


#: How the group level scores feature sets (recorded in ``*_settings.json``).
GROUP_METHOD = (
    "Repeated stratified group k-fold cross-validation (participants, or --cv-groups, never "
    "straddle folds); per fold a pipeline fit on the training folds only: mean imputation, "
    "standardisation, PCA keeping every component, classifier with its regularisation chosen by "
    "an inner grouped cross-validation. Permutation p-value: diagnoses permuted between "
    "participants on the first repeat's folds. Comparisons: corrected resampled t-test (Nadeau & "
    "Bengio 2003) on fold-wise balanced accuracy. Region importance: drop in the decision margin "
    "toward the true class when a region is hidden from the classifier."
)


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


def build_classifier(name: str, seed: int, inner_groups: int | Any,
                     fixed: bool = False, from_time_series: bool = False,
                     memory: Memory | None = None) -> GridSearchCV:
    """The classifier with its regularisation chosen by inner grouped cross-validation.

    ``inner_groups`` is the number of :class:`GroupKFold` splits, or any scikit-learn ``cv``
    (a splitter, a list of splits). ``fixed`` keeps only the estimator's default regularisation
    (for training folds too small for an inner cross-validation). ``from_time_series`` puts
    :func:`tangent_space` first: the pipeline then takes region time series. ``memory``
    caches the pipeline's fitted transformers (:class:`sklearn.pipeline.Pipeline`).
    """
    if name == "logreg":
        estimator = LogisticRegression(max_iter=2000)
        grid = {"clf__C": np.logspace(-3, 2, 6)}
    elif name == "svm":
        estimator = SVC(kernel="linear", probability=True, random_state=seed)
        grid = {"clf__C": np.logspace(-3, 1, 5)}
    else:
        estimator = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
        grid = {"clf__alpha": np.logspace(-4, 0, 3)}
    steps = [("impute", SimpleImputer(strategy="mean")), ("scale", StandardScaler()),
             ("reduce", PCA(svd_solver="full")), ("clf", estimator)]
    if from_time_series:
        steps.insert(0, ("connectivity", tangent_space()))
    pipeline = Pipeline(steps, memory=memory)
    if fixed:
        grid = {key: [pipeline.get_params()[key]] for key in grid}
    cv = GroupKFold(n_splits=inner_groups) if isinstance(inner_groups, int) else inner_groups
    return GridSearchCV(pipeline, grid, cv=cv, scoring="balanced_accuracy", refit=True)


def inner_cv(y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[Any, bool]:
    """The inner cross-validation of one training fold: ``(cv, fixed)`` for :func:`build_classifier`.

    Stratified and grouped (:class:`StratifiedGroupKFold`), with as many splits (at most 3) as
    the class held by the fewest groups allows, so that every inner training fold holds every
    class. When a class lies in a single group, no split can: the inner search is skipped
    (``fixed``: one fit at the default regularisation on the whole training fold).
    """
    groups_per_class = min(len(np.unique(groups[y == c])) for c in np.unique(y))
    splits = min(3, groups_per_class)
    if splits < 2:
        everything = np.arange(len(y))
        return [(everything, everything)], True
    return StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed), False


def read_targets(participants: pd.DataFrame | None, column: str,
                 target_map: dict[str, str]) -> pd.Series:
    """The target of each participant (index: participant_id with ``sub-``), recoded and cleaned."""
    if participants is None:
        raise BadDataError("the group level needs a participants.tsv: fMRIPrep derivatives have "
                           "none, so give the raw dataset as BIDS_DIR (with -d fmriprep=PATH)")
    if column not in participants.columns:
        available = ", ".join(c for c in participants.columns if c != "participant_id")
        raise BadDataError(f"participants.tsv has no column {column!r} (columns: {available})")
    values = participants.set_index("participant_id")[column]
    if pd.api.types.is_float_dtype(values) and (values.dropna() % 1 == 0).all():
        # Integer codes (e.g. ADHD-200 DX 0/1/2/3) read as float because of missing values:
        # keep them "1", not "1.0", so that --target-map 1=adhd matches.
        values = values.astype("Int64")
    values = values.map(lambda v: None if pd.isna(v) else str(v).strip())
    if target_map:
        values = values.map(lambda v: target_map.get(v, v) if v is not None else None)
    missing = values.isna() | values.isin(["", "n/a"])
    if missing.any():
        log.warning("%d participants have no %s value and are left out", int(missing.sum()), column)
    return values[~missing]


def make_splits(y: np.ndarray, groups: np.ndarray, folds: int, repeats: int,
                seed: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Repeated stratified group k-fold: ``(repeat, fold, train_idx, test_idx)``.

    With fewer groups than folds (``--cv-groups`` with few sites), leave-one-group-out instead,
    once (its folds do not depend on the seed), with a warning.
    """
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise BadDataError(f"only {n_groups} cross-validation group: cross-validation needs two "
                           "or more (use another --cv-groups column or none)")
    if n_groups < folds:
        log.warning("only %d cross-validation groups for %d folds: using leave-one-group-out "
                    "(%d folds, one repeat) instead", n_groups, folds, n_groups)
        return [(0, fold, train, test) for fold, (train, test)
                in enumerate(LeaveOneGroupOut().split(np.zeros(len(y)), y, groups))]
    splits = []
    for repeat in range(repeats):
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for fold, (train, test) in enumerate(cv.split(np.zeros(len(y)), y, groups)):
            splits.append((repeat, fold, train, test))
    return splits


def fold_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray,
                 classes: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC (one-vs-rest for >2 classes) and macro F1."""
    if len(np.unique(y_true)) < 2:
        auc = np.nan
    elif len(classes) == 2:
        auc = roc_auc_score(y_true == classes[1], proba[:, 1])
    else:
        auc = roc_auc_score(y_true, proba, multi_class="ovr", labels=classes)
    return {"accuracy": accuracy_score(y_true, y_pred),
            "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
            "roc_auc": auc, "f1_macro": f1_score(y_true, y_pred, average="macro")}


def corrected_ttest(diff: np.ndarray, n_train: int, n_test: int) -> tuple[float, float]:
    """Nadeau & Bengio's corrected resampled t-test on fold-wise differences: (t, two-sided p)."""
    k = len(diff)
    var = np.var(diff, ddof=1)
    if k < 2 or var == 0:
        return (np.nan, np.nan) if np.allclose(diff, 0) else (np.inf, 0.0)
    t = diff.mean() / np.sqrt((1 / k + n_test / n_train) * var)
    return float(t), float(2 * stats.t.sf(abs(t), df=k - 1))


def evaluate(es: EmbeddingSet, splits: list, classes: np.ndarray, config: Config
             ) -> tuple[pd.DataFrame, pd.DataFrame, list, np.ndarray]:
    """Cross-validate one embedding set; returns per-fold metrics, predictions, models, confusion."""
    y = es.runs["target"].to_numpy()
    groups = es.runs["cv_group"].to_numpy()
    rows, predictions, models = [], [], []
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    participants = es.runs["participant_id"].to_numpy()
    unsearched = 0
    # The tangent step does not depend on the regularisation: fitted once per inner training
    # set and reused across the grid (joblib's cache of the pipeline, in a private temporary
    # folder), not once per grid point.
    with tempfile.TemporaryDirectory(prefix="roimae-cv-") as cache:
        memory = Memory(cache, verbose=0) if es.from_time_series else None
        for repeat, fold, train, test in splits:
            # The inner CV needs two groups in the training folds; with --cv-groups and a single
            # group left for training (e.g. two sites) it falls back to the participants.
            inner = groups if len(np.unique(groups[train])) >= 2 else participants
            cv, fixed = inner_cv(y[train], inner[train], config.random_seed + repeat)
            unsearched += fixed
            model = build_classifier(config.group.classifier, config.random_seed, cv, fixed=fixed,
                                     from_time_series=es.from_time_series, memory=memory)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(es.X[train], y[train], groups=inner[train])
            proba = model.predict_proba(es.X[test])
            pred = model.classes_[proba.argmax(1)]
            rows.append({"repeat": repeat, "fold": fold, "n_train": len(train), "n_test": len(test),
                         **fold_metrics(y[test], pred, proba, classes),
                         "selected": json.dumps({k.removeprefix("clf__"): float(v)
                                                 for k, v in model.best_params_.items()})})
            confusion += confusion_matrix(y[test], pred, labels=classes)
            predictions.append(pd.DataFrame({
                "repeat": repeat, "fold": fold, "run": es.runs["run"].to_numpy()[test],
                "participant_id": es.runs["participant_id"].to_numpy()[test], "target": y[test],
                "predicted": pred, **{f"p_{c}": proba[:, i] for i, c in enumerate(model.classes_)}}))
            models.append((repeat, test, model))
    if unsearched:
        log.warning("%s: in %d of %d folds a class has a single participant (or group) in "
                    "training, too few for an inner cross-validation: the regularisation is the "
                    "classifier's default there", es.name, unsearched, len(splits))
    return pd.DataFrame(rows), pd.concat(predictions, ignore_index=True), models, confusion


def permutation_pvalue(es: EmbeddingSet, splits: list, folds_table: pd.DataFrame,
                       config: Config) -> tuple[float, np.ndarray]:
    """Label-permutation p-value of the mean balanced accuracy (participant-level permutations)."""
    n_perm = config.group.n_permutations
    if n_perm == 0:
        return np.nan, np.array([])
    params = Counter(folds_table["selected"]).most_common(1)[0][0]
    base = build_classifier(config.group.classifier, config.random_seed, 2,
                            from_time_series=es.from_time_series).estimator
    base.set_params(**{f"clf__{k}": v for k, v in json.loads(params).items()})
    classifier = base.steps[-1][1]
    first_repeat = [s for s in splits if s[0] == 0]
    # Tangent space, imputation, scaling and PCA do not see the labels: fit once per fold, not
    # per permutation.
    folds = []
    for _, _, train, test in first_repeat:
        prepare = Pipeline(base.steps[:-1]).fit(es.X[train])
        folds.append((train, test, prepare.transform(es.X[train]), prepare.transform(es.X[test])))
    y = es.runs["target"].to_numpy()
    participants = es.runs["participant_id"].to_numpy()
    unique, inverse = np.unique(participants, return_inverse=True)
    first = {p: y[np.argmax(participants == p)] for p in unique}
    labels = np.array([first[p] for p in unique])
    rng = np.random.default_rng(config.random_seed)
    null = np.empty(n_perm)
    for i in range(n_perm):
        y_perm = rng.permutation(labels)[inverse]
        scores = []
        for train, test, x_train, x_test in folds:
            if len(np.unique(y_perm[train])) < 2:
                scores.append(0.5)
                continue
            with warnings.catch_warnings():
                # A permuted test fold may hold one class only; its score is still defined.
                warnings.simplefilter("ignore")
                model = clone(classifier).fit(x_train, y_perm[train])
                scores.append(balanced_accuracy_score(y_perm[test], model.predict(x_test)))
        null[i] = np.mean(scores)
    # The null is computed on the first repeat's folds, so the observed score is too.
    observed = folds_table.loc[folds_table["repeat"] == 0, "balanced_accuracy"].mean()
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_perm)), null


def true_class_margin(model, X: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Decision margin of each row toward its true class (index into ``model.classes_``).

    Binary: the signed decision function (the log-odds for logistic regression); several classes:
    the true class's score minus the best other score. Classifiers without a decision function
    (the MLP) use the log-odds of the true class's probability. Unlike a probability, the margin
    does not saturate, and for a linear probe it is linear in the embedding, so effects that do
    not depend on the class average out over participants.
    """
    if hasattr(model, "decision_function"):
        scores = model.decision_function(X)
        if scores.ndim == 1:
            return np.where(true == 1, scores, -scores)
    else:
        proba = np.clip(model.predict_proba(X), 1e-12, 1 - 1e-12)
        scores = np.log(proba)
        if scores.shape[1] == 2:
            return scores[np.arange(len(X)), true] - scores[np.arange(len(X)), 1 - true]
    own = scores[np.arange(len(X)), true]
    others = scores.copy()
    others[np.arange(len(X)), true] = -np.inf
    return own - others.max(axis=1)


def region_importance(es: EmbeddingSet, models: list, atlas: Atlas) -> pd.DataFrame:
    """Drop in the cross-validated decision margin toward the true class when a region is hidden.

    For every fold model and each of its test runs, region r is hidden from the classifier: the
    run embedding is replaced by the occluded embedding the participant level kept for r (the
    ``global`` readout), or every feature that involves r is set to its training mean (region and
    connectivity features: the pipeline imputes them). The importance of a region is the mean
    margin drop, averaged over repeats within each participant and then over participants; its
    standard error is across participants (repeats reuse the same people, so they are not
    independent).
    """
    n_regions = len(atlas.regions)
    y = es.runs["target"].to_numpy()
    participants = es.runs["participant_id"].to_numpy()
    drops: list[np.ndarray] = []
    owners: list[str] = []
    for _, test, model in models:
        classes = list(model.classes_)
        true = np.array([classes.index(v) for v in y[test]])
        X_test = es.X[test]
        if es.from_time_series:
            # Hide regions from the features the fold's tangent step made, not the time series.
            X_test = model.best_estimator_[:1].transform(list(X_test))
            model = model.best_estimator_[1:]
        base = true_class_margin(model, X_test, true)                   # (n_test,)
        drop = np.full((len(test), n_regions), np.nan)
        if es.regions is None:
            for row, i in enumerate(test):
                occluded = es.runs["occluded"].iloc[i]                  # (R, C)
                valid = np.isfinite(occluded).all(axis=1)
                if valid.any():
                    margins = true_class_margin(model, occluded[valid],
                                                np.repeat(true[row], valid.sum()))
                    drop[row, valid] = base[row] - margins
        else:
            for r, columns in enumerate(es.regions):
                if len(columns):
                    hidden = X_test.copy()
                    hidden[:, columns] = np.nan
                    drop[:, r] = base - true_class_margin(model, hidden, true)
        drops.append(drop)
        owners.extend(participants[test])
    per_test = pd.DataFrame(np.vstack(drops))                           # (tests, R)
    stacked = per_test.groupby(np.array(owners)).mean().to_numpy()      # (participants, R)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        count = np.isfinite(stacked).sum(axis=0)
        mean = np.nanmean(stacked, axis=0)
        se = np.nanstd(stacked, axis=0, ddof=1) / np.sqrt(np.maximum(count, 1))
    table = atlas.table().copy()
    table["importance"] = mean
    table["importance_se"] = se
    return table


def _read_features(readout: str, path: Path) -> np.ndarray | None:
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


def _time_series_set(vectors: list[np.ndarray], n_regions: int
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
    by_kept = _feature_regions("connectivity", len(kept), 0)
    regions = [np.array([], dtype=np.int64)] * n_regions
    for j, r in enumerate(kept):
        regions[r] = by_kept[j]
    return X, regions


def _feature_regions(readout: str, n_regions: int, n_features: int) -> list[np.ndarray] | None:
    """For each region, the feature columns that involve it (None for the run embedding)."""
    if readout in ("connectivity", "fc"):
        first, second = edge_regions(n_regions)
        return [np.flatnonzero((first == r) | (second == r)) for r in range(n_regions)]
    if readout == "region":
        width = n_features // n_regions
        return [np.arange(r * width, (r + 1) * width) for r in range(n_regions)]
    return None


def _load_embedding_set(desc: str | None, readout: str, dataset, writer: DerivativesWriter,
                        targets: pd.Series, cv_groups: pd.Series | None, atlas_label: str,
                        n_regions: int, groups: bool = True) -> EmbeddingSet:
    """The runs of one model (or the FC baseline, ``desc=None``) through one readout.

    Only complete runs count (their completion sidecar, written last, lists every output), and
    every run of a model's set must come from the same model (by weight hash).
    """
    rows, vectors, missing = [], [], 0
    models: dict[str, list[str]] = {}
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
            models.setdefault(str(meta["Model"].get("SHA256")), []).append(run.name)
            # The sidecar, not the files' presence, says whether attribution ran: files of an
            # earlier run with attribution may remain beside a rerun with --no-attribution.
            attributed = meta.get("Attribution") is not None
            path = {"global": out.mean_embedding, "region": out.region_embedding,
                    "connectivity": out.connectivity}[readout]
        vec = _read_features(readout, path)
        if vec is None:
            missing += 1
            continue
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
        X, regions = _time_series_set(vectors, n_regions)
    else:
        X = np.vstack(vectors)
        regions = _feature_regions(readout, n_regions, X.shape[1])
    return EmbeddingSet(name, stem, desc, readout, pd.DataFrame(rows), X, regions,
                        next(iter(models)) if models else None)


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


def clear_group_outputs(outputs: GroupOutputs, map_stems: list[str]) -> list[Path]:
    """Remove the outputs of an earlier group run with the same prefix (and maps of ``map_stems``).

    The completion marker (``<prefix>_settings.json``) goes first: from then on, until this run
    writes it again last, the folder says that its prefix's outputs are incomplete.

    Parameters
    ----------
    outputs : bidsapp.outputs.GroupOutputs
        The paths of this ``--target``.
    map_stems : list of str
        ``atlas-<a>_<set>`` of every set this run scores: their target-free maps go too.

    Returns
    -------
    list of Path
        The files removed.
    """
    removed = []
    for path in outputs.written(map_stems):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


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


def covariate_set(participants: pd.DataFrame, columns: list[str], runs: pd.DataFrame
                  ) -> EmbeddingSet:
    """The ``covariates`` baseline: phenotype columns only, for the given runs.

    Numeric columns enter as they are, other columns one-hot (categories from every participant,
    which does not look at the target); missing values stay NaN and are imputed inside the
    training folds.
    """
    table = participants.set_index("participant_id")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise BadDataError(f"participants.tsv has no column {', '.join(map(repr, missing))} "
                           "(--covariates)")
    parts = []
    for column in columns:
        values = table[column].replace({"n/a": np.nan})
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().sum() == values.notna().sum():
            parts.append(numeric.rename(column).to_frame())
        else:
            dummies = pd.get_dummies(values.astype("string").str.strip(), prefix=column,
                                     dtype=float)
            dummies[values.isna()] = np.nan
            parts.append(dummies)
    features = pd.concat(parts, axis=1)
    X = features.loc[runs["participant_id"]].to_numpy(dtype=np.float64)
    return EmbeddingSet("covariates", "feature-covariates", None, "covariates",
                        runs.assign(table=None, occluded=None).reset_index(drop=True), X)


def _wanted_sets(config: Config) -> list[tuple[str | None, str]]:
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


def _check_classes(es: EmbeddingSet, folds: int) -> np.ndarray:
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


def summarize(folds_table: pd.DataFrame, p_value: float) -> pd.DataFrame:
    """Mean +- sd of each metric over folds, with the permutation p-value of balanced accuracy."""
    rows = [{"metric": m, "mean": folds_table[m].mean(), "sd": folds_table[m].std(ddof=1),
             "permutation_p": p_value if m == "balanced_accuracy" else np.nan} for m in METRICS]
    return pd.DataFrame(rows)


def run_group(config: Config) -> None:
    """Classification, comparison, group attribution and the group report."""
    if not config.group.target:
        raise UsageError("the group level needs --target COLUMN (a participants.tsv column, "
                         "e.g. diagnosis)")
    # Many small fits: BLAS threads only add overhead (about 30x slower on 2 busy cores).
    with threadpool_limits(limits=1), _warnings_to_log():
        _run_group(config)


@contextlib.contextmanager
def _warnings_to_log() -> Iterator[None]:
    """Send library warnings (scikit-learn's, dozens per run on small designs) to the log file.

    They are logged at DEBUG level, which the log file keeps and the console shows only with
    ``-v``; the console gets one line counting them.
    """
    counts: Counter[str] = Counter()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        counts[category.__name__] += 1
        log.debug("%s: %s (%s:%d)", category.__name__, message, filename, lineno)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            yield
        finally:
            if counts:
                log.info("%d library warning(s) (%s) were written to the log file",
                         sum(counts.values()), ", ".join(sorted(counts)))


def _splits(sets: list[EmbeddingSet], config: Config) -> list:
    """The folds every set is scored on (:func:`make_splits`), checked for the sets."""
    splits = make_splits(sets[0].runs["target"].to_numpy(), sets[0].runs["cv_group"].to_numpy(),
                         config.group.cv_folds, config.group.cv_repeats, config.random_seed)
    y = sets[0].runs["target"].to_numpy()
    for _, _, train, _ in splits:
        if len(np.unique(y[train])) < 2:
            # Only with --cv-groups: a group holding (nearly) one class leaves a fold without
            # the other in training.
            raise BadDataError(f"a cross-validation fold has a single class ({y[train][0]!r}) "
                               f"in training: the --cv-groups {config.group.cv_groups} groups "
                               "are confounded with the target; use other groups or none")
    smallest_training = min(len(train) for _, _, train, _ in splits)
    for es in sets:
        if es.from_time_series and smallest_training <= es.X[0].shape[1]:
            # Measured (docs/science.md): the training runs' tangent vectors are then offset
            # from the test runs' (each training run pulls the reference toward itself).
            log.warning("%s: %d regions for as few as %d training runs: with fewer training "
                        "runs than regions the tangent space can misplace the test runs (scores "
                        "near chance; docs/science.md)", es.name, es.X[0].shape[1],
                        smallest_training)
    return splits


def _run_group(config: Config) -> None:
    atlas = load_atlas(config.atlas, config.atlas_labels)
    dataset = discover_runs(config)
    writer = DerivativesWriter(config.output_dir, source_datasets=dataset.datasets)
    writer.ensure_dataset_description()
    writer.ensure_bidsignore(BIDSIGNORE)
    targets = read_targets(dataset.participants, config.group.target, config.group.target_map)
    no_row = runs_without_row(dataset.runs, dataset.participants)
    if no_row:
        if len(no_row) == len(dataset.runs):
            raise BadDataError(f"none of the {len(no_row)} selected runs has a row in "
                               f"{dataset.participants_file} (e.g. {no_row[0]}): its "
                               "participant_id column must name their participants")
        log.warning("runs left out, without a row in participants.tsv: %d (%s)", len(no_row),
                    ", ".join(no_row[:5]) + (" ..." if len(no_row) > 5 else ""))
    cv_groups = None
    if config.group.cv_groups:
        if config.group.cv_groups not in dataset.participants.columns:
            raise BadDataError(f"participants.tsv has no column {config.group.cv_groups!r} "
                               "(--cv-groups)")
        cv_groups = dataset.participants.set_index("participant_id")[config.group.cv_groups]
    label = atlas_label(atlas)
    wanted = _wanted_sets(config)
    sets = []
    for desc, readout in wanted:
        if readout == "covariates":
            continue
        try:
            sets.append(_load_embedding_set(desc, readout, dataset, writer, targets, cv_groups,
                                            label, len(atlas.regions)))
        except NoInputError:
            if readout not in ("fc", "tangent") or config.group.compare is not None:
                raise
            # Outputs of an older participant level: the baseline is left out, not the models.
            log.warning("no functional-connectivity baseline files (rerun the participant "
                        "level to write them): the %s baseline is left out", readout)
    if not sets:
        raise UsageError("the covariates baseline alone has no runs to score: compare it with a "
                         "model or fc")
    # The same runs for every set, so that folds and comparisons are paired.
    common = set.intersection(*(set(es.runs["run"]) for es in sets))
    for es in sets:
        keep = es.runs["run"].isin(common).to_numpy()
        es.runs, es.X = es.runs[keep].reset_index(drop=True), es.X[keep]
    if any(readout == "covariates" for _, readout in wanted):
        runs = sets[0].runs[["run", "participant_id", "target", "cv_group"]]
        sets.append(covariate_set(dataset.participants, config.group.covariates, runs))
    classes = _check_classes(sets[0], config.group.cv_folds)
    splits = _splits(sets, config)
    outputs = GroupOutputs(config.output_dir, config.group.target)
    ensure_dir(outputs.dir)
    # A group job killed while writing left temporary files; this job rewrites every output.
    for tmp in [*remove_stale_temporaries(outputs.dir),
                *remove_stale_temporaries(outputs.figures),
                *remove_temporaries(outputs.report)]:
        log.info("removed %s, left by an interrupted job", tmp.name)
    for old in clear_group_outputs(outputs, [outputs.map_stem(label, es.stem) for es in sets]):
        log.info("removed %s of an earlier group run", old.name)
    results: dict[str, SetResult] = {}
    for es in sets:
        folds_table, predictions, models, confusion = evaluate(es, splits, classes, config)
        p_value, null = permutation_pvalue(es, splits, folds_table, config)
        summary = summarize(folds_table, p_value)
        writer.write_tsv(outputs.set_table(es.stem, "folds"), folds_table)
        writer.write_tsv(outputs.set_table(es.stem, "predictions"), predictions)
        writer.write_tsv(outputs.set_table(es.stem, "metrics"), summary)
        writer.write_tsv(outputs.set_table(es.stem, "confusion"),
                         pd.DataFrame(confusion, index=classes, columns=classes)
                         .rename_axis("true").reset_index())
        attribution = group_attribution(es, models, atlas)
        note = regions_note(es)
        if note is not None:
            log.warning("%s", note)
        if es.readout != "covariates":
            write_group_maps(writer, outputs, outputs.map_stem(label, es.stem), attribution,
                             atlas)
        bal = summary.set_index("metric").loc["balanced_accuracy"]
        log.info("%s: balanced accuracy %.3f +- %.3f (permutation p = %.4f, %d runs, "
                 "%d participants, %d features)", es.name, bal["mean"], bal["sd"], p_value,
                 len(es.runs), es.runs["participant_id"].nunique(), es.n_features)
        results[es.name] = SetResult(folds=folds_table, summary=summary,
                                     predictions=predictions, confusion=confusion,
                                     attribution=attribution, null=null, regions_note=note)
    n_runs = len(sets[0].runs)
    comparison = compare_sets(results, splits, n_runs)
    if comparison is not None:
        writer.write_tsv(outputs.comparison, comparison)
    scores = score_table(sets, results, splits, n_runs)
    writer.write_tsv(outputs.scores, scores)
    report = write_group_report(outputs, classes, results, comparison, scores, atlas)
    # Last: the completion marker of this prefix's outputs (see clear_group_outputs).
    atomic_write_json(outputs.settings, {
        "target": config.group.target, "target_map": config.group.target_map,
        "classes": classes.tolist(), "classifier": config.group.classifier,
        "cv_folds": config.group.cv_folds, "cv_repeats": config.group.cv_repeats,
        "cv_groups": config.group.cv_groups or "participant_id",
        "n_permutations": config.group.n_permutations, "random_seed": config.random_seed,
        "features": config.group.features, "covariates": config.group.covariates,
        "sets": [es.name for es in sets],
        "models": {es.name: es.model_sha256 for es in sets if es.model_sha256},
        "method": GROUP_METHOD,
    })
    log.info("group report: %s", report)


def effective_rank(X: np.ndarray) -> float:
    """``exp`` of the entropy of the normalised squared singular values of centred ``X``.

    1 when every row differs from the mean along one direction, ``min(n, F)`` when the variance
    is spread evenly: how many directions the features of different participants really use.
    """
    finite = X[:, np.isfinite(X).all(axis=0)]
    centred = finite - finite.mean(axis=0)
    power = np.linalg.svd(centred, compute_uv=False) ** 2
    if power.sum() == 0:
        return 0.0
    share = power[power > 0] / power.sum()
    return float(np.exp(-(share * np.log(share)).sum()))


def score_table(sets: list[EmbeddingSet], results: Mapping[str, SetResult], splits: list,
                n_runs: int) -> pd.DataFrame:
    """One row per feature set: scores, and the comparison with the best baseline.

    The best baseline is the one of highest mean balanced accuracy; each other set is compared
    with it on the same folds by the corrected resampled t-test.
    """
    n_test = int(np.mean([len(s[3]) for s in splits]))
    baselines = [es.name for es in sets if es.is_baseline]
    best = max(baselines, key=lambda n: results[n].folds["balanced_accuracy"].mean(),
               default=None)
    rows = []
    for es in sets:
        folds = results[es.name].folds
        summary = results[es.name].summary.set_index("metric")
        row = {"set": es.name, "kind": "baseline" if es.is_baseline else "model",
               "desc": es.desc, "readout": es.readout, "features": es.n_features,
               "effective_rank": effective_rank(es.feature_matrix()),
               "balanced_accuracy": summary.loc["balanced_accuracy", "mean"],
               "balanced_accuracy_sd": summary.loc["balanced_accuracy", "sd"],
               "roc_auc": summary.loc["roc_auc", "mean"],
               "permutation_p": summary.loc["balanced_accuracy", "permutation_p"],
               "best_baseline": best, "difference": np.nan, "t": np.nan, "p_corrected": np.nan}
        if best is not None and es.name != best:
            diff = (folds["balanced_accuracy"].to_numpy()
                    - results[best].folds["balanced_accuracy"].to_numpy())
            t, p = corrected_ttest(diff, n_runs - n_test, n_test)
            row.update(difference=diff.mean(), t=t, p_corrected=p)
        rows.append(row)
    return pd.DataFrame(rows)


def group_attribution(es: EmbeddingSet, models: list, atlas: Atlas) -> pd.DataFrame:
    """Mean participant measures per region, and the classifier-based importance."""
    table = atlas.table().copy()
    table["voxels"] = region_voxels(atlas.contiguous(np.asarray(atlas.image.dataobj)),
                                    len(atlas.regions))
    tables = [pd.read_csv(p, sep="\t", na_values="n/a") for p in es.runs["table"] if p is not None]
    for measure in ("reconerror", "occlusion"):
        if tables:
            values = np.vstack([t[measure].to_numpy(dtype=float) for t in tables])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                table[measure] = np.nanmean(values, axis=0)
                table[f"{measure}_sd"] = np.nanstd(values, axis=0, ddof=1) if len(tables) > 1 \
                    else np.nan
        else:
            table[measure] = np.nan
    if es.regions is not None or all(o is not None for o in es.runs["occluded"]):
        importance = region_importance(es, models, atlas)
        table["importance"] = importance["importance"]
        table["importance_se"] = importance["importance_se"]
    else:
        table["importance"] = np.nan
        table["importance_se"] = np.nan
    table["runs"] = len(tables)
    return table


def write_group_maps(writer: DerivativesWriter, outputs: GroupOutputs, map_stem: str,
                     table: pd.DataFrame, atlas: Atlas) -> None:
    """Group NIfTI maps on the atlas grid, the region table and the summary by region group.

    Parameters
    ----------
    writer : bidsapp.bids.derivatives.DerivativesWriter
    outputs : bidsapp.outputs.GroupOutputs
        The paths of this ``--target``.
    map_stem : str
        ``atlas-<a>_<set>`` (:meth:`~bidsapp.outputs.GroupOutputs.map_stem`).
    table : pandas.DataFrame
        The group region table (:func:`group_attribution`).
    atlas : bidsapp.atlas.Atlas
    """
    contiguous = atlas.contiguous(np.asarray(atlas.image.dataobj))
    for column in ("reconerror", "occlusion", "importance"):
        if table[column].notna().any():
            writer.write_nifti(outputs.group_map(map_stem, column),
                               region_map(table[column].to_numpy(), contiguous,
                                          atlas.image.affine))
    writer.write_tsv(outputs.attribution(map_stem), table)
    measures = tuple(c for c in ("importance", "reconerror", "occlusion") if table[c].notna().any())
    if measures and atlas.has_groups:
        writer.write_tsv(outputs.attribution_by_group(map_stem), group_summary(table, measures))


def compare_sets(results: Mapping[str, SetResult], splits: list, n_runs: int
                 ) -> pd.DataFrame | None:
    """Pairwise fold-wise comparison of balanced accuracy (corrected resampled t-test)."""
    descs = list(results)
    if len(descs) < 2:
        return None
    n_test = int(np.mean([len(s[3]) for s in splits]))
    rows = []
    for i, a in enumerate(descs):
        for b in descs[i + 1:]:
            fa = results[a].folds["balanced_accuracy"].to_numpy()
            fb = results[b].folds["balanced_accuracy"].to_numpy()
            diff = fa - fb
            t, p = corrected_ttest(diff, n_runs - n_test, n_test)
            rows.append({"a": a, "b": b, "balanced_accuracy_a": fa.mean(),
                         "balanced_accuracy_b": fb.mean(), "difference": diff.mean(),
                         "difference_sd": diff.std(ddof=1), "folds": len(diff), "t": t,
                         "p_corrected": p, "a_better_folds": int((diff > 0).sum()),
                         "b_better_folds": int((diff < 0).sum())})
    return pd.DataFrame(rows)

