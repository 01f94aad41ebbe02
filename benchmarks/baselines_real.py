"""Benchmark: the fc and tangent baselines on the real development_fmri region signals.

    python benchmarks/baselines_real.py [--realdata DIR] [--cv-repeats 3] [--participants 0]

Reads the 155 participants' AAL116 region signals of ``timeseries_aal116.npz`` directly (no
pseudo-volumes, no model) and scores child vs adult from each baseline with the group level's own
folds (:func:`bidsapp.classification.make_splits`) and pipeline
(:func:`bidsapp.classification.build_classifier`):
``fc`` (Fisher z of Pearson correlations) and ``tangent`` (tangent space, reference fit in the
training folds). One JSON row per baseline, then one with their fold-wise difference (corrected
resampled t-test).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
from _common import emit
from sklearn.metrics import balanced_accuracy_score
from threadpoolctl import threadpool_limits

from bidsapp.classification import build_classifier, corrected_ttest, inner_cv, make_splits
from bidsapp.readouts import vectorize

REALDATA = Path(os.environ.get("ROIMAE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")
                ) / "realdata" / "development_fmri"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--realdata", type=Path, default=REALDATA)
    parser.add_argument("--cv-folds", type=int, default=5)
    parser.add_argument("--cv-repeats", type=int, default=3)
    parser.add_argument("--participants", type=int, default=0,
                        help="the first N participants of each class (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = np.load(args.realdata / "timeseries_aal116.npz")
    ids = np.array([s if str(s).startswith("sub-") else f"sub-{s}" for s in data["subjects"]])
    table = pd.read_csv(args.realdata / "participants.tsv", sep="\t").set_index("participant_id")
    y = table.loc[ids, "Child_Adult"].to_numpy()
    keep = np.arange(len(ids))
    if args.participants:
        keep = np.concatenate([np.flatnonzero(y == c)[:args.participants] for c in np.unique(y)])
    ids, y = ids[keep], y[keep]
    signals = data["timeseries"][keep].astype(np.float64)           # (n, frames, 116)
    time_series = np.empty(len(ids), dtype=object)
    time_series[:] = list(signals)
    sets = {"fc": (np.array([vectorize(np.corrcoef(ts.T)) for ts in signals]), False),
            "tangent": (time_series, True)}
    splits = make_splits(y, ids, args.cv_folds, args.cv_repeats, args.seed)
    scores = {}
    with threadpool_limits(limits=1):
        for name, (X, from_time_series) in sets.items():
            folds = []
            for repeat, _, train, test in splits:
                cv, fixed = inner_cv(y[train], ids[train], args.seed + repeat)
                model = build_classifier("logreg", args.seed, cv, fixed=fixed,
                                         from_time_series=from_time_series)
                model.fit(X[train], y[train], groups=ids[train])
                folds.append(balanced_accuracy_score(y[test], model.predict(X[test])))
            scores[name] = np.array(folds)
            emit({"benchmark": "baselines_real", "set": name, "participants": len(ids),
                  "regions": signals.shape[2], "frames": signals.shape[1],
                  "cv": f"{args.cv_repeats}x{args.cv_folds}-fold",
                  "balanced_accuracy": scores[name].mean(),
                  "balanced_accuracy_sd": scores[name].std(ddof=1)})
    diff = scores["tangent"] - scores["fc"]
    n_test = int(np.mean([len(s[3]) for s in splits]))
    t, p = corrected_ttest(diff, len(ids) - n_test, n_test)
    emit({"benchmark": "baselines_real", "set": "tangent - fc", "participants": len(ids),
          "difference": diff.mean(), "t": t, "p_corrected": p,
          "tangent_better_folds": int((diff > 0).sum()), "fc_better_folds": int((diff < 0).sum())})


if __name__ == "__main__":
    main()
