"""Classify participants from roimae embeddings with a cross-validated scikit-learn pipeline.

Usage::

    python examples/cross_validated_pipeline.py MODEL.safetensors BIDS_DIR [--target diagnosis]

``BIDS_DIR`` holds fMRIPrep-style runs (``sub-*/func/*_desc-preproc_bold.nii.gz``) and a
``participants.tsv`` with the target column. :class:`bidsapp.RoimaeEmbedder` turns each image into
its run embedding inside the pipeline, so cross-validation sees images, not features; ``memory``
keeps the preprocessed images between folds. Runs of one participant stay in one fold.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bidsapp import RoimaeEmbedder


def main(argv: list[str] | None = None) -> np.ndarray:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("model", type=Path, help="model.safetensors (or its folder)")
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("--target", default="diagnosis", help="column of participants.tsv")
    parser.add_argument("--folds", type=int, default=2)
    args = parser.parse_args(argv)

    participants = pd.read_csv(args.bids_dir / "participants.tsv", sep="\t").set_index(
        "participant_id")
    imgs = sorted(args.bids_dir.glob("sub-*/**/func/*_desc-preproc_bold.nii.gz")) + sorted(
        args.bids_dir.glob("sub-*/func/*_desc-preproc_bold.nii.gz"))
    subjects = [img.name.split("_")[0] for img in imgs]
    y = participants.loc[subjects, args.target].astype(str).to_numpy()

    with tempfile.TemporaryDirectory() as cache:
        pipeline = make_pipeline(RoimaeEmbedder(args.model, memory=cache), StandardScaler(),
                                 LogisticRegression(max_iter=1000))
        scores = cross_val_score(pipeline, [str(img) for img in imgs], y, groups=subjects,
                                 cv=StratifiedGroupKFold(n_splits=args.folds),
                                 scoring="balanced_accuracy")
    print(f"{len(imgs)} runs of {len(set(subjects))} participants, target {args.target!r}: "
          f"balanced accuracy {scores.mean():.3f} +- {scores.std():.3f} over {len(scores)} folds")
    return scores


if __name__ == "__main__":
    main()
