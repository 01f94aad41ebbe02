"""``participants.tsv`` columns at the group level: the target, and the covariates baseline.

The target is recoded (``--target-map``) and cleaned (``n/a`` and spreadsheet ``NaN`` cells are
missing); covariates enter the ``covariates`` baseline as they are (numbers) or one-hot (labels),
and a covariate that gives the target away (the target itself, or one value per class) is refused
before anything is scored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bidsapp.errors import BadDataError, UsageError
from bidsapp.features import EmbeddingSet
from bidsapp.logs import get_logger

log = get_logger("group")


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
    # BIDS writes a missing value as n/a; a "NaN" written by a spreadsheet is no class either.
    missing = values.map(lambda v: not isinstance(v, str)
                         or v.lower() in ("", "n/a", "nan", "na")).astype(bool)
    if missing.any():
        log.warning("%d participants have no %s value and are left out", int(missing.sum()), column)
    values = values[~missing]
    unmatched = sorted(set(target_map) - set(values))
    if unmatched:
        raise UsageError(f"--target-map {', '.join(map(repr, unmatched))}: no participant has "
                         f"{'this' if len(unmatched) == 1 else 'these'} {column} value(s) (values: "
                         f"{', '.join(sorted(set(values))[:10])})")
    return values.map(lambda v: target_map.get(v, v))


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
        if values.loc[runs["participant_id"].unique()].isna().all():
            raise BadDataError(f"participants.tsv column {column!r} has no value for any scored "
                               "participant (--covariates): leave it out")
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


def check_no_leakage(participants: pd.DataFrame, target: str, covariates: list[str]) -> None:
    """Refuse (64) a covariate that is the target, or a function of it (constant per class).

    Such a covariate scores the target perfectly and says nothing about the images; it is
    checked on the participants with both values, before anything is scored.
    """
    table = participants.set_index("participant_id")
    for column in covariates:
        if column == target:
            raise UsageError(f"--covariates {column} is the --target itself: the covariates "
                             "baseline would score it perfectly; leave it out")
        if column not in table.columns:
            continue   # refused by covariate_set, with the columns there are
        both = table[[target, column]].replace({"n/a": np.nan}).dropna()
        if both[target].nunique() < 2:
            continue
        per_class = both.groupby(target)[column].nunique()
        if (per_class == 1).all() and both.drop_duplicates(target)[column].nunique() == len(per_class):
            raise UsageError(f"--covariates {column} is a function of the target {target} (one "
                             f"{column} value per class): the covariates baseline would score it "
                             "perfectly; leave it out")
