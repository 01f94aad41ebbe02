"""Benchmark: roimae's readouts against the connectivity and covariates baselines on real signals.

    python benchmarks/real_signal.py WORK_DIR [--per-class N] [--epochs 5] [--preset tiny]

``../shared/realdata/development_fmri`` holds the real AAL116 region signals of 155 participants of
OpenNeuro ds000228 (child vs adult) and ``make_pseudovolumes.py``, which paints them into an
fMRIPrep-style dataset (4 mm MNI152NLin6Asym). On it this script runs the whole product: pretrain
with every ``--maskings`` (roi and random by default; on ``--pretrain-participants`` of them, spread
evenly over the sorted ids, or all), the participant level with each model
(embeddings and readouts; ``--no-attribution``, which classification does not use), and one group
level that scores every readout of every model beside the ``fc`` and ``covariates`` baselines on
identical folds (``--target Child_Adult``; the covariates are ``Gender Handedness``, since ``Age``
defines the label). It prints one JSON row per feature set and one with the timings. Steps whose
outputs exist are reused (the pretrain level refuses to overwrite a model), so a rerun only
re-scores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import emit

REALDATA = (Path(os.environ.get("ROIMAE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
            / "realdata" / "development_fmri")


def roimae(*argv: object) -> None:
    """Run one roimae level in-process; a non-zero exit stops the benchmark."""
    from bidsapp.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"roimae {' '.join(map(str, argv))} exited with {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--realdata", type=Path,
                        default=Path(os.environ.get("ROIMAE_REALDATA", REALDATA)))
    parser.add_argument("--per-class", type=int, default=0, help="participants per class (0: all)")
    parser.add_argument("--grid", type=int, default=4, choices=(2, 4))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pretrain-participants", type=int, default=0,
                        help="pretrain on this many participants (0: all)")
    parser.add_argument("--window-frames", type=int, default=20)
    parser.add_argument("--maskings", nargs="+", default=["roi", "random"])
    parser.add_argument("--features", nargs="+", default=["connectivity", "region", "global"])
    parser.add_argument("--cv-folds", type=int, default=5)
    parser.add_argument("--cv-repeats", type=int, default=5)
    parser.add_argument("--n-permutations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bids, out = args.work / "bids", args.work / "out"
    timings = {}
    start = time.perf_counter()
    if not (bids / "participants.tsv").is_file():
        command = [sys.executable, str(args.realdata / "make_pseudovolumes.py"), str(bids),
                   "--grid", str(args.grid)]
        if args.per_class:
            command += ["--per-class", str(args.per_class)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    timings["pseudovolumes_seconds"] = time.perf_counter() - start
    common = ["--random-seed", args.seed, "--skip-bids-validation"]
    participants = pd.read_csv(bids / "participants.tsv", sep="\t")
    ids = sorted(participants["participant_id"].str.removeprefix("sub-"))
    subset = []
    if 0 < args.pretrain_participants < len(ids):
        pick = np.linspace(0, len(ids) - 1, args.pretrain_participants).round().astype(int)
        subset = ["--participant-label", *(ids[i] for i in pick)]
    for masking in args.maskings:
        start = time.perf_counter()
        if not (out / "models" / f"desc-{masking}" / "model.json").is_file():
            roimae(bids, out, "pretrain", "--masking", masking, "--preset", args.preset,
                   "--epochs", args.epochs, "--window-frames", args.window_frames, *subset,
                   *common)
        timings[f"pretrain_{masking}_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        roimae(bids, out, "participant", "--model-desc", masking, "--no-attribution",
               "--no-reports", *common)
        timings[f"participant_{masking}_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    roimae(bids, out, "group", "--target", "Child_Adult", "--compare", *args.maskings, "fc", "tangent",
           "covariates", "--features", *args.features, "--covariates", "Gender", "Handedness",
           "--cv-folds", args.cv_folds, "--cv-repeats", args.cv_repeats,
           "--n-permutations", args.n_permutations, *common)
    timings["group_seconds"] = time.perf_counter() - start
    scores = pd.read_csv(out / "group" / "target-ChildAdult_scores.tsv", sep="\t", na_values="n/a")
    setup = {"dataset": "development_fmri pseudo-volumes", "grid_mm": args.grid,
             "participants": len(participants), "preset": args.preset, "epochs": args.epochs,
             "pretrain_participants": len(subset) - 1 if subset else len(participants),
             "window_frames": args.window_frames, "cv": f"{args.cv_repeats}x{args.cv_folds}-fold"}
    for row in scores.to_dict(orient="records"):
        emit({"benchmark": "real_signal", **setup, **row})
    emit({"benchmark": "real_signal_timings", **setup, **timings})


if __name__ == "__main__":
    main()
