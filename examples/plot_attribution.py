"""Attribute one run to atlas regions and plot the maps with nilearn.

Usage::

    python examples/plot_attribution.py MODEL.safetensors BOLD.nii.gz MASK.nii.gz OUT.png

Prints the regions the embedding relies on most (representation sensitivity) and the best
reconstructed ones, and saves both maps, on the input image's grid, over the MNI152 template.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from nilearn import image, plotting

from bidsapp import embed_img, load_model


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("bold", type=Path)
    parser.add_argument("mask", type=Path)
    parser.add_argument("out", type=Path, help="PNG figure")
    args = parser.parse_args(argv)

    model = load_model(args.model)
    run = embed_img(model, args.bold, args.mask, attribution=True)
    regions = run.regions.dropna(subset=["occlusion"])
    print("regions the embedding relies on most:")
    print(regions.nlargest(5, "occlusion")[["name", "group", "occlusion"]].to_string(index=False))
    print("best reconstructed regions:")
    print(regions.nsmallest(5, "reconerror")[["name", "group", "reconerror"]].to_string(index=False))

    fig, axes = plt.subplots(2, 1, figsize=(9, 6))
    for ax, (measure, title, cmap) in zip(axes, (
            ("occlusion", "representation sensitivity", "hot"),
            ("reconerror", "reconstruction error", "viridis")), strict=True):
        # NaN marks regions too small for the model's grid: shown as background.
        values = np.nan_to_num(run.maps[measure].get_fdata())
        shown = image.new_img_like(run.maps[measure], values)
        # Outside the regions is 0; nilearn's default threshold (1e-6) would hide small values.
        plotting.plot_stat_map(shown, display_mode="ortho", cut_coords=(0, -20, 0), axes=ax,
                               threshold=1e-3 * np.abs(values).max(), cmap=cmap, title=title,
                               colorbar=True, draw_cross=False)
    fig.savefig(args.out, dpi=80)
    plt.close(fig)
    print(f"maps saved to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
