"""Embed fMRI images with a pretrained roimae model, from Python.

Usage::

    python examples/embed_images.py MODEL.safetensors BOLD.nii.gz [BOLD.nii.gz ...] \
        [--mask MASK.nii.gz] [--out embeddings.tsv]

Each image is a 4D BOLD series in MNI space (fMRIPrep's ``desc-preproc_bold``, or any MNI grid);
without ``--mask`` nilearn's MNI152 brain mask is used. The run embeddings (one row per image)
are printed and, with ``--out``, written as a TSV.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bidsapp import embed_imgs, load_model


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("model", type=Path, help="model.safetensors (or its folder)")
    parser.add_argument("imgs", nargs="+", type=Path, help="4D BOLD images in MNI space")
    parser.add_argument("--mask", type=Path, help="one brain mask for every image")
    parser.add_argument("--out", type=Path, help="write the embeddings here (TSV)")
    args = parser.parse_args(argv)

    model = load_model(args.model)
    card = model.card or {}
    print(f"{model.path.name}: {card.get('backbone')} {card.get('preset')}, {model.masking} "
          f"masking, trained on {card.get('training_data', {}).get('dataset')}")
    runs = embed_imgs(model, args.imgs, args.mask, attribution=False)
    table = pd.DataFrame([run.embedding for run in runs], columns=model.feature_names)
    table.insert(0, "image", [img.name for img in args.imgs])
    table.insert(1, "windows", [len(run.window_embeddings) for run in runs])
    print(table.iloc[:, :6].to_string(index=False))
    if args.out is not None:
        table.to_csv(args.out, sep="\t", index=False)
    return table


if __name__ == "__main__":
    main()
