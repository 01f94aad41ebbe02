"""The ``group`` level: classify participants from their embeddings, compare maskings, map regions.

Orchestration only: the feature sets come from :mod:`bidsapp.features`, their scores, comparisons
and region importance from :mod:`bidsapp.classification`; this module runs them on the same folds
and writes ``group/`` and the group report (names from :class:`bidsapp.outputs.GroupOutputs`).
"""


from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from bidsapp.atlas import Atlas, group_summary, load_atlas, region_map, region_voxels
from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.bids.layout import InputDataset, discover_runs, runs_without_row
from bidsapp.classification import (
    GROUP_METHOD,
    SetResult,
    check_splits,
    compare_sets,
    evaluate,
    permutation_pvalue,
    region_importance,
    score_table,
    summarize,
)
from bidsapp.config import Config
from bidsapp.errors import BadDataError, NoInputError, UsageError
from bidsapp.features import (
    EmbeddingSet,
    check_classes,
    load_feature_set,
    regions_note,
    wanted_sets,
)
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
    atlas_label,
)
from bidsapp.phenotypes import check_no_leakage, covariate_set, read_targets
from bidsapp.reports import write_group_report

log = get_logger("group")


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


def _run_group(config: Config) -> None:
    atlas = load_atlas(config.atlas, config.atlas_labels)
    dataset = discover_runs(config)
    writer = DerivativesWriter(config.output_dir, source_datasets=dataset.datasets)
    sets = _feature_sets(config, dataset, writer, atlas)
    classes = check_classes(sets[0], config.group.cv_folds)
    splits = check_splits(sets, config)
    # Every check passed: only now does the output's provenance name this run's inputs.
    writer.ensure_dataset_description()
    writer.ensure_bidsignore(BIDSIGNORE)
    outputs = _fresh_outputs(config, sets, atlas_label(atlas))
    results = {es.name: _score_set(es, splits, classes, config, writer, outputs, atlas)
               for es in sets}
    n_runs = len(sets[0].runs)
    comparison = compare_sets(results, splits, n_runs)
    if comparison is not None:
        writer.write_tsv(outputs.comparison, comparison)
    scores = score_table(sets, results, splits, n_runs)
    writer.write_tsv(outputs.scores, scores)
    setup = {"atlas": f"{atlas.name} ({len(atlas.regions)} regions, {atlas.sha256()[:12]})",
             "runs": n_runs, "participants": sets[0].runs["participant_id"].nunique(),
             "cross-validation": f"{config.group.cv_repeats} x {config.group.cv_folds}-fold, "
                                 f"groups: {config.group.cv_groups or 'participant_id'}",
             "permutations": config.group.n_permutations, "classifier": config.group.classifier,
             "covariates": ", ".join(config.group.covariates or []) or "none",
             **{f"model {es.desc}": es.model_sha256 for es in sets if es.model_sha256}}
    report = write_group_report(outputs, classes, results, comparison, scores, atlas, setup)
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


def _targets(config: Config, dataset: InputDataset) -> tuple[pd.Series, pd.Series | None]:
    """Each participant's target and cross-validation group, checked against the runs."""
    targets = read_targets(dataset.participants, config.group.target, config.group.target_map)
    if config.group.covariates:
        check_no_leakage(dataset.participants, config.group.target, config.group.covariates)
    no_row = runs_without_row(dataset.runs, dataset.participants)
    if no_row:
        if len(no_row) == len(dataset.runs):
            raise BadDataError(f"none of the {len(no_row)} selected runs has a row in "
                               f"{dataset.participants_file} (e.g. {no_row[0]}): its "
                               "participant_id column must name their participants")
        log.warning("runs left out, without a row in participants.tsv: %d (%s)", len(no_row),
                    ", ".join(no_row[:5]) + (" ..." if len(no_row) > 5 else ""))
    if not config.group.cv_groups:
        return targets, None
    if config.group.cv_groups not in dataset.participants.columns:
        raise BadDataError(f"participants.tsv has no column {config.group.cv_groups!r} "
                           "(--cv-groups)")
    return targets, dataset.participants.set_index("participant_id")[config.group.cv_groups]


def _feature_sets(config: Config, dataset: InputDataset, writer: DerivativesWriter,
                  atlas: Atlas) -> list[EmbeddingSet]:
    """Every feature set to score, on the same runs (reads; writes nothing)."""
    targets, cv_groups = _targets(config, dataset)
    wanted = wanted_sets(config)
    atlas_sha256 = atlas.sha256()
    sets = []
    for desc, readout in wanted:
        if readout == "covariates":
            continue
        try:
            sets.append(load_feature_set(desc, readout, dataset, writer, targets, cv_groups,
                                         atlas_label(atlas), len(atlas.regions),
                                         atlas.has_groups, atlas_sha256))
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
    return sets


def _fresh_outputs(config: Config, sets: list[EmbeddingSet], label: str) -> GroupOutputs:
    """The paths of this ``--target``, cleared of an earlier or interrupted group run's files."""
    outputs = GroupOutputs(config.output_dir, config.group.target)
    ensure_dir(outputs.dir)
    # A group job killed while writing left temporary files; this job rewrites every output.
    for tmp in [*remove_stale_temporaries(outputs.dir),
                *remove_stale_temporaries(outputs.figures),
                *remove_temporaries(outputs.report)]:
        log.info("removed %s, left by an interrupted job", tmp.name)
    for old in clear_group_outputs(outputs):
        log.info("removed %s of an earlier group run", old.name)
    return outputs


def _score_set(es: EmbeddingSet, splits: list, classes: np.ndarray, config: Config,
               writer: DerivativesWriter, outputs: GroupOutputs, atlas: Atlas) -> SetResult:
    """Cross-validate one set, write its tables and maps, and log its score."""
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
        write_group_maps(writer, outputs, outputs.map_stem(atlas_label(atlas), es.stem),
                         attribution, atlas)
    bal = summary.set_index("metric").loc["balanced_accuracy"]
    log.info("%s: balanced accuracy %.3f +- %.3f (permutation p = %.4f, %d runs, "
             "%d participants, %d features)", es.name, bal["mean"], bal["sd"], p_value,
             len(es.runs), es.runs["participant_id"].nunique(), es.n_features)
    return SetResult(folds=folds_table, summary=summary, predictions=predictions,
                     confusion=confusion, attribution=attribution, null=null, regions_note=note)


def clear_group_outputs(outputs: GroupOutputs) -> list[Path]:
    """Remove the outputs of an earlier group run with the same prefix.

    The completion marker (``<prefix>_settings.json``) goes first: from then on, until this run
    writes it again last, the folder says that its prefix's outputs are incomplete.

    Parameters
    ----------
    outputs : bidsapp.outputs.GroupOutputs
        The paths of this ``--target``.

    Returns
    -------
    list of Path
        The files removed.
    """
    removed = []
    for path in outputs.written():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


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


#: What each group map holds (its sidecar's ``Description``).
GROUP_MAPS = {
    "reconerror": "Mean over the scored runs of each region's masked reconstruction error",
    "occlusion": "Mean over the scored runs of each region's representation sensitivity",
    "importance": "Drop in the cross-validated decision margin toward the true class when the "
                  "region is hidden from the classifier, mean over participants",
}


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
            path = outputs.group_map(map_stem, column)
            writer.write_nifti(path, region_map(table[column].to_numpy(), contiguous,
                                                atlas.image.affine))
            writer.write_sidecar(path, {"Description": GROUP_MAPS[column], "Atlas": atlas.name,
                                        "Target": outputs.target,
                                        "RunsWithAttribution": int(table["runs"].iloc[0]),
                                        "NaNMeans": "no value for the region (not hidden, or no "
                                                    "run with a value)"})
    writer.write_tsv(outputs.attribution(map_stem), table)
    measures = tuple(c for c in ("importance", "reconerror", "occlusion") if table[c].notna().any())
    if measures and atlas.has_groups:
        writer.write_tsv(outputs.attribution_by_group(map_stem), group_summary(table, measures))
