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

Region importance for the decision: for each test participant and region r, the drop in the
cross-validated decision margin toward the participant's true class when its run embedding is replaced
by the occluded embedding the participant level kept for r (regions the embedding needs to be
classified correctly score high; regions whose occlusion moves every participant alike average out).
"""

from __future__ import annotations

import contextlib
import glob
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedGroupKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from bidsapp.atlas import Atlas, load_atlas
from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.bids.layout import discover_runs
from bidsapp.checkpoint import masking_desc
from bidsapp.config import Config
from bidsapp.errors import BadDataError, NoInputError, UsageError
from bidsapp.io import (
    atomic_write_json,
    ensure_dir,
    remove_stale_temporaries,
    remove_temporaries,
)
from bidsapp.logs import get_logger
from bidsapp.participant import BIDSIGNORE, RunOutputs, _atlas_label, group_summary, region_map

log = get_logger("group")

METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro")


@dataclass
class EmbeddingSet:
    """The run embeddings of one model (``desc``) with each run's participant, label and group."""

    desc: str
    runs: pd.DataFrame          # run, participant_id, target, cv_group, table, occluded
    X: np.ndarray               # (n_runs, C)
    model_sha256: str | None = None   # the one model every run's embedding comes from


def build_classifier(name: str, seed: int, inner_groups: int) -> GridSearchCV:
    """The classifier with its regularisation chosen by inner grouped cross-validation."""
    if name == "logreg":
        estimator = LogisticRegression(max_iter=2000)
        grid = {"clf__C": np.logspace(-3, 2, 6)}
    elif name == "svm":
        estimator = SVC(kernel="linear", probability=True, random_state=seed)
        grid = {"clf__C": np.logspace(-3, 1, 5)}
    else:
        estimator = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
        grid = {"clf__alpha": np.logspace(-4, 0, 3)}
    pipeline = Pipeline([("scale", StandardScaler()), ("clf", estimator)])
    return GridSearchCV(pipeline, grid, cv=GroupKFold(n_splits=inner_groups),
                        scoring="balanced_accuracy", refit=True)


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
    """Repeated stratified group k-fold: ``(repeat, fold, train_idx, test_idx)``."""
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


def _inner_groups(groups: np.ndarray, train: np.ndarray) -> int:
    return int(min(3, len(np.unique(groups[train]))))


def evaluate(es: EmbeddingSet, splits: list, classes: np.ndarray, config: Config
             ) -> tuple[pd.DataFrame, pd.DataFrame, list, np.ndarray]:
    """Cross-validate one embedding set; returns per-fold metrics, predictions, models, confusion."""
    y = es.runs["target"].to_numpy()
    groups = es.runs["cv_group"].to_numpy()
    rows, predictions, models = [], [], []
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    participants = es.runs["participant_id"].to_numpy()
    for repeat, fold, train, test in splits:
        # The inner CV needs two groups in the training folds; with --cv-groups and a single
        # group left for training (e.g. two sites) it falls back to the participants.
        inner = groups if len(np.unique(groups[train])) >= 2 else participants
        model = build_classifier(config.group.classifier, config.random_seed,
                                 _inner_groups(inner, train))
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
    return pd.DataFrame(rows), pd.concat(predictions, ignore_index=True), models, confusion


def permutation_pvalue(es: EmbeddingSet, splits: list, folds_table: pd.DataFrame,
                       config: Config) -> tuple[float, np.ndarray]:
    """Label-permutation p-value of the mean balanced accuracy (participant-level permutations)."""
    n_perm = config.group.n_permutations
    if n_perm == 0:
        return np.nan, np.array([])
    params = Counter(folds_table["selected"]).most_common(1)[0][0]
    base = build_classifier(config.group.classifier, config.random_seed, 2).estimator
    base.set_params(**{f"clf__{k}": v for k, v in json.loads(params).items()})
    y = es.runs["target"].to_numpy()
    participants = es.runs["participant_id"].to_numpy()
    unique, inverse = np.unique(participants, return_inverse=True)
    first = {p: y[np.argmax(participants == p)] for p in unique}
    labels = np.array([first[p] for p in unique])
    rng = np.random.default_rng(config.random_seed)
    null = np.empty(n_perm)
    first_repeat = [s for s in splits if s[0] == 0]
    for i in range(n_perm):
        y_perm = rng.permutation(labels)[inverse]
        scores = []
        for _, _, train, test in first_repeat:
            if len(np.unique(y_perm[train])) < 2:
                scores.append(0.5)
                continue
            with warnings.catch_warnings():
                # A permuted test fold may hold one class only; its score is still defined.
                warnings.simplefilter("ignore")
                model = clone(base).fit(es.X[train], y_perm[train])
                scores.append(balanced_accuracy_score(y_perm[test], model.predict(es.X[test])))
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

    For every fold model and each of its test runs, the run embedding is replaced by the occluded
    embedding the participant level kept for each region; the importance of a region is the mean
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
        for i in test:
            true = np.array([classes.index(y[i])])
            base = true_class_margin(model, es.X[i : i + 1], true)[0]
            rows = es.runs["occluded"].iloc[i]                          # (R, C)
            valid = np.isfinite(rows).all(axis=1)
            drop = np.full(n_regions, np.nan)
            if valid.any():
                margins = true_class_margin(model, rows[valid], np.repeat(true, valid.sum()))
                drop[valid] = base - margins
            drops.append(drop)
            owners.append(participants[i])
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


def _load_embedding_set(desc: str, dataset, writer: DerivativesWriter, targets: pd.Series,
                        cv_groups: pd.Series | None, atlas_label: str) -> EmbeddingSet:
    rows, vectors, missing = [], [], 0
    models: dict[str, list[str]] = {}
    for run in dataset.runs:
        pid = f"sub-{run.subject}"
        if pid not in targets.index:
            continue
        out = RunOutputs(writer, run, desc, atlas_label)
        # Only complete runs: a participant job killed part-way leaves files but no sidecar.
        meta = out.completion()
        if meta is None:
            missing += 1
            continue
        vec = pd.read_csv(out.mean_embedding, sep="\t", na_values="n/a").to_numpy(
            dtype=np.float64)[0]
        if not np.isfinite(vec).all():
            raise BadDataError(f"{out.mean_embedding.name} holds non-finite values; rerun the "
                               "participant level for it (--overwrite) with a sound model")
        models.setdefault(str(meta["Model"].get("SHA256")), []).append(run.name)
        # The sidecar, not the files' presence, says whether attribution ran: files of an
        # earlier run with attribution may remain beside a rerun with --no-attribution.
        attributed = meta.get("Attribution") is not None
        occluded = None
        if attributed:
            occluded = pd.read_csv(out.occluded, sep="\t", na_values="n/a").filter(
                regex=r"^e\d+$").to_numpy(dtype=np.float64)
        vectors.append(vec)
        rows.append({"run": run.name, "participant_id": pid, "target": targets[pid],
                     "cv_group": pid if cv_groups is None else str(cv_groups.get(pid)),
                     "table": out.table if attributed else None,
                     "occluded": occluded})
    if missing:
        log.warning("desc-%s: %d selected runs have no complete embedding (participant level "
                    "not run for them, or its job was killed before the end); they are left out",
                    desc, missing)
    if not rows:
        raise NoInputError(f"no desc-{desc} embeddings found in the output directory: run the "
                           f"participant level with the desc-{desc} model first")
    check_one_model(desc, models)
    return EmbeddingSet(desc, pd.DataFrame(rows), np.vstack(vectors), next(iter(models)))


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


def clear_group_outputs(out_dir: Path, prefix: str, map_stems: list[str]) -> list[Path]:
    """Remove the outputs of an earlier group run with the same ``prefix`` (and maps of ``map_stems``).

    The completion marker (``<prefix>_settings.json``) goes first: from then on, until this run
    writes it again last, the folder says that its ``prefix`` outputs are incomplete.
    """
    figures = out_dir / "figures"
    paths = [out_dir / f"{prefix}_settings.json", *sorted(out_dir.glob(f"{prefix}_*")),
             *sorted(figures.glob(f"{prefix}_*"))]
    for stem in map_stems:
        paths += sorted(out_dir.glob(f"{glob.escape(stem)}_*"))
    removed = []
    for path in dict.fromkeys(paths):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def regions_note(es: EmbeddingSet) -> str | None:
    """Why region importance cannot be computed for ``es`` (runs without attribution), if so."""
    without = int(sum(o is None for o in es.runs["occluded"]))
    if without == 0:
        return None
    runs = ("no run has" if without == len(es.runs)
            else f"{without} of {len(es.runs)} runs have no")
    return (f"region importance not computed for desc-{es.desc}: {runs} region attribution "
            "(the participant level ran with --no-attribution); rerun it without "
            "--no-attribution (and with --overwrite) for the region maps")


def _find_descs(config: Config) -> list[str]:
    if config.group.compare:
        return [masking_desc(d) for d in config.group.compare]
    if config.participant.model_desc:
        return [masking_desc(config.participant.model_desc)]
    found = sorted({p.name.split("_desc-")[1].split("_")[0]
                    for p in config.output_dir.glob("sub-*/**/*_stat-mean_embedding.tsv")})
    if not found:
        raise NoInputError(f"no embeddings in {config.output_dir}: run the participant level "
                           "first")
    return found


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
    if es.runs["cv_group"].nunique() < folds:
        raise BadDataError(f"only {es.runs['cv_group'].nunique()} cross-validation groups for "
                           f"{folds} folds (lower --cv-folds)")
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
    with threadpool_limits(limits=1):
        _run_group(config)


def _run_group(config: Config) -> None:
    atlas = load_atlas(config.atlas, config.atlas_labels)
    dataset = discover_runs(config)
    writer = DerivativesWriter(config.output_dir, source_datasets=dataset.datasets)
    writer.ensure_dataset_description()
    writer.ensure_bidsignore(BIDSIGNORE)
    targets = read_targets(dataset.participants, config.group.target, config.group.target_map)
    cv_groups = None
    if config.group.cv_groups:
        if config.group.cv_groups not in dataset.participants.columns:
            raise BadDataError(f"participants.tsv has no column {config.group.cv_groups!r} "
                               "(--cv-groups)")
        cv_groups = dataset.participants.set_index("participant_id")[config.group.cv_groups]
    label = _atlas_label(atlas)
    sets = [_load_embedding_set(d, dataset, writer, targets, cv_groups, label)
            for d in _find_descs(config)]
    # The same runs for every set, so that folds and comparisons are paired.
    common = set.intersection(*(set(es.runs["run"]) for es in sets))
    for es in sets:
        keep = es.runs["run"].isin(common).to_numpy()
        es.runs, es.X = es.runs[keep].reset_index(drop=True), es.X[keep]
    classes = _check_classes(sets[0], config.group.cv_folds)
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
    out_dir = ensure_dir(config.output_dir / "group")
    # A group job killed while writing left temporary files; this job rewrites every output.
    for tmp in [*remove_stale_temporaries(out_dir), *remove_stale_temporaries(out_dir / "figures"),
                *remove_temporaries(config.output_dir / "group.html")]:
        log.info("removed %s, left by an interrupted job", tmp.name)
    prefix = f"target-{''.join(c for c in config.group.target if c.isalnum())}"
    for old in clear_group_outputs(out_dir, prefix, [f"atlas-{label}_desc-{es.desc}"
                                                     for es in sets]):
        log.info("removed %s of an earlier group run", old.name)
    results = {}
    for es in sets:
        folds_table, predictions, models, confusion = evaluate(es, splits, classes, config)
        p_value, null = permutation_pvalue(es, splits, folds_table, config)
        summary = summarize(folds_table, p_value)
        stem = f"{prefix}_desc-{es.desc}"
        writer.write_tsv(out_dir / f"{stem}_folds.tsv", folds_table)
        writer.write_tsv(out_dir / f"{stem}_predictions.tsv", predictions)
        writer.write_tsv(out_dir / f"{stem}_metrics.tsv", summary)
        writer.write_tsv(out_dir / f"{stem}_confusion.tsv",
                         pd.DataFrame(confusion, index=classes, columns=classes)
                         .rename_axis("true").reset_index())
        attribution = group_attribution(es, models, atlas)
        note = regions_note(es)
        if note is not None:
            log.warning("%s", note)
        write_group_maps(writer, out_dir, f"atlas-{label}_desc-{es.desc}", attribution, atlas,
                         prefix)
        bal = summary.set_index("metric").loc["balanced_accuracy"]
        log.info("desc-%s: balanced accuracy %.3f +- %.3f (permutation p = %.4f, %d runs, "
                 "%d participants)", es.desc, bal["mean"], bal["sd"], p_value, len(es.runs),
                 es.runs["participant_id"].nunique())
        results[es.desc] = {"folds": folds_table, "summary": summary, "predictions": predictions,
                            "confusion": confusion, "attribution": attribution, "null": null,
                            "regions_note": note}
    comparison = compare_sets(results, splits, len(sets[0].runs))
    if comparison is not None:
        writer.write_tsv(out_dir / f"{prefix}_comparison.tsv", comparison)
    from bidsapp.reports import write_group_report

    report = write_group_report(config.output_dir, prefix, classes, results, comparison, atlas)
    # Last: the completion marker of this prefix's outputs (see clear_group_outputs).
    atomic_write_json(out_dir / f"{prefix}_settings.json", {
        "target": config.group.target, "target_map": config.group.target_map,
        "classes": classes.tolist(), "classifier": config.group.classifier,
        "cv_folds": config.group.cv_folds, "cv_repeats": config.group.cv_repeats,
        "cv_groups": config.group.cv_groups or "participant_id",
        "n_permutations": config.group.n_permutations, "random_seed": config.random_seed,
        "descs": [es.desc for es in sets], "models": {es.desc: es.model_sha256 for es in sets},
        "method": " ".join((__doc__ or "").split()),
    })
    log.info("group report: %s", report)


def group_attribution(es: EmbeddingSet, models: list, atlas: Atlas) -> pd.DataFrame:
    """Mean participant measures per region, and the classifier-based importance."""
    table = atlas.table().copy()
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
    if all(o is not None for o in es.runs["occluded"]):
        importance = region_importance(es, models, atlas)
        table["importance"] = importance["importance"]
        table["importance_se"] = importance["importance_se"]
    else:
        table["importance"] = np.nan
        table["importance_se"] = np.nan
    table["runs"] = len(tables)
    return table


def write_group_maps(writer: DerivativesWriter, out_dir: Path, stem: str, table: pd.DataFrame,
                     atlas: Atlas, prefix: str) -> None:
    """Group NIfTI maps on the atlas grid, the region table and the summary by region group."""
    contiguous = atlas.contiguous(np.asarray(atlas.image.dataobj))
    for column in ("reconerror", "occlusion", "importance"):
        if table[column].notna().any():
            name = f"{prefix}_{stem}" if column == "importance" else stem
            path = out_dir / f"{name}_stat-{column}_boldmap.nii.gz"
            writer.write_nifti(path, region_map(table[column].to_numpy(), contiguous,
                                                atlas.image.affine))
    writer.write_tsv(out_dir / f"{prefix}_{stem}_attribution.tsv", table)
    measures = tuple(c for c in ("importance", "reconerror", "occlusion") if table[c].notna().any())
    if measures:
        writer.write_tsv(out_dir / f"{prefix}_{stem}_stat-bygroup_attribution.tsv",
                         group_summary(table, measures))


def compare_sets(results: dict, splits: list, n_runs: int) -> pd.DataFrame | None:
    """Pairwise fold-wise comparison of balanced accuracy (corrected resampled t-test)."""
    descs = list(results)
    if len(descs) < 2:
        return None
    n_test = int(np.mean([len(s[3]) for s in splits]))
    rows = []
    for i, a in enumerate(descs):
        for b in descs[i + 1:]:
            fa = results[a]["folds"]["balanced_accuracy"].to_numpy()
            fb = results[b]["folds"]["balanced_accuracy"].to_numpy()
            diff = fa - fb
            t, p = corrected_ttest(diff, n_runs - n_test, n_test)
            rows.append({"a": a, "b": b, "balanced_accuracy_a": fa.mean(),
                         "balanced_accuracy_b": fb.mean(), "difference": diff.mean(),
                         "difference_sd": diff.std(ddof=1), "folds": len(diff), "t": t,
                         "p_corrected": p, "a_better_folds": int((diff > 0).sum()),
                         "b_better_folds": int((diff < 0).sum())})
    return pd.DataFrame(rows)

