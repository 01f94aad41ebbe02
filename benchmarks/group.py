"""Benchmark: the group level's classification on 1,000 synthetic participants.

    python benchmarks/group.py [--participants 1000] [--permutations 1000]

Embeddings (64 dims) with a planted class difference go through the default linear probe (nested
choice of the regularisation), 5-fold cross-validation and the label-permutation test. Floor: one fit
of the same pipeline on all participants. Target: under 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import emit
from threadpoolctl import threadpool_limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--participants", type=int, default=1000)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--cv-repeats", type=int, default=1,
                        help="fold sets (the group level's default is 5)")
    args = parser.parse_args()
    from bidsapp.classification import build_classifier, evaluate, make_splits, permutation_pvalue
    from bidsapp.config import Config
    from bidsapp.features import EmbeddingSet

    rng = np.random.default_rng(0)
    n = args.participants
    y = np.where(np.arange(n) % 2 == 0, "control", "adhd")
    X = rng.standard_normal((n, args.dims))
    X[y == "adhd", :4] += 0.3
    runs = pd.DataFrame({"run": [f"r{i}" for i in range(n)],
                         "participant_id": [f"sub-{i}" for i in range(n)], "target": y,
                         "cv_group": [f"sub-{i}" for i in range(n)], "table": None,
                         "occluded": None})
    es = EmbeddingSet("roi-global", "desc-roi_feature-global", "roi", "global", runs, X)
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(bids_dir=Path(tmp), output_dir=Path(tmp) / "out", analysis_level="group",
                        work_dir=Path(tmp) / "w",
                        group={"target": "diagnosis", "cv_repeats": args.cv_repeats,
                               "n_permutations": args.permutations})
    with threadpool_limits(limits=1):
        start = time.perf_counter()
        build_classifier("logreg", 0, 3).fit(X, y, groups=runs["cv_group"])
        floor = time.perf_counter() - start
        start = time.perf_counter()
        splits = make_splits(y, runs["cv_group"].to_numpy(), 5, args.cv_repeats, 0)
        folds, *_ = evaluate(es, splits, np.array(["adhd", "control"]), config)
        cv_seconds = time.perf_counter() - start
        p_value, _ = permutation_pvalue(es, splits, folds, config)
        seconds = time.perf_counter() - start
    emit({"benchmark": "group", "participants": n, "dims": args.dims, "folds": 5,
          "cv_repeats": args.cv_repeats,
          "permutations": args.permutations, "seconds": seconds, "cv_seconds": cv_seconds,
          "permutation_seconds": seconds - cv_seconds,
          "balanced_accuracy": float(folds["balanced_accuracy"].mean()), "p_value": p_value,
          "floor": "one nested fit on all participants", "floor_seconds": floor,
          "ratio": seconds / floor, "target_seconds": 120})


if __name__ == "__main__":
    main()
