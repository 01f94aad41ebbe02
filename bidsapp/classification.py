"""Cross-validated classification of feature sets, their comparison and region importance.

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

Every classifier is one scikit-learn pipeline fit on the training folds only: mean imputation,
standardisation and a PCA that keeps every component (a rotation onto the training rows' span,
exact for an L2-penalised linear model, and what makes 10^4 connectivity features cheap), then the
classifier; for ``tangent``, nilearn's ``ConnectivityMeasure`` comes first, so that its reference
(the geometric mean of the training runs' covariances) is fit on the training folds only.

Region importance for the decision: for each test participant and region r, the drop in the
cross-validated decision margin toward the participant's true class when r is hidden from the
classifier: for the run embedding, by the occluded embedding the participant level kept for r; for
region and connectivity features, by replacing every feature that involves r with its training mean
(regions the features need to be classified correctly score high; regions whose occlusion moves
every participant alike average out).
"""


from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from joblib import Memory
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

from bidsapp.atlas import Atlas
from bidsapp.config import Config
from bidsapp.errors import BadDataError
from bidsapp.features import EmbeddingSet, tangent_space
from bidsapp.logs import get_logger

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
class SetResult:
    """The cross-validated results of one feature set, from the group level to its report.

    Attributes
    ----------
    folds : pandas.DataFrame
        One row per repeat and fold: sizes, :data:`METRICS`, the selected
        regularisation (``<prefix>_<set>_folds.tsv``).
    summary : pandas.DataFrame
        Mean and sd of each metric, the permutation p-value (``..._metrics.tsv``).
    predictions : pandas.DataFrame
        Out-of-fold predictions and class probabilities (``..._predictions.tsv``).
    confusion : ndarray of int, shape (n_classes, n_classes)
        Summed over folds and repeats (true x predicted).
    attribution : pandas.DataFrame
        The group region table (``..._attribution.tsv``).
    null : ndarray
        The balanced accuracies of the label permutations (empty without permutations).
    regions_note : str or None
        Why region importance is missing, if it is.
    """

    folds: pd.DataFrame
    summary: pd.DataFrame
    predictions: pd.DataFrame
    confusion: np.ndarray
    attribution: pd.DataFrame
    null: np.ndarray
    regions_note: str | None = None


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


def check_splits(sets: list[EmbeddingSet], config: Config) -> list:
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


def summarize(folds_table: pd.DataFrame, p_value: float) -> pd.DataFrame:
    """Mean +- sd of each metric over folds, with the permutation p-value of balanced accuracy."""
    rows = [{"metric": m, "mean": folds_table[m].mean(), "sd": folds_table[m].std(ddof=1),
             "permutation_p": p_value if m == "balanced_accuracy" else np.nan} for m in METRICS]
    return pd.DataFrame(rows)


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
