"""Benchmark: a BOLD run -> the model-ready cache, against the floor of decompressing the same file.

    python benchmarks/preprocess.py [--frames 200] [--repeats 3]

Rows: the 2 mm MNI grid (91x109x91, gzipped int16, as fMRIPrep writes) and a 3 mm grid (resampled to
2 mm). Floor: ``nibabel`` load + full decompression of the same file (``np.asarray(img.dataobj)``).
Target: preprocess <= 1.5x its floor on the 2 mm grid. Imports happen before the clock starts, for
the floor and the measurement alike; each is the fastest of ``--repeats`` fresh processes.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
from _common import best_of, emit
from scipy import ndimage

from bidsapp.cache import PreprocessParams
from bidsapp.preprocess import prepare_run

MNI_2MM = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])


def write_run(directory: Path, shape: tuple[int, int, int], voxel: float, frames: int) -> tuple:
    """A gzipped int16 BOLD run and its mask.

    An ellipsoid brain (about a quarter of the box, as in MNI space) with a smooth baseline between
    about 300 and 1200 (grey/white/CSF-like contrast) and 1.5% temporal noise: it compresses about
    as badly as real BOLD, so the decompression floor is realistic.
    """
    rng = np.random.default_rng(0)
    affine = MNI_2MM.copy()
    affine[:3, :3] *= voxel / 2
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1)[:, None, None, None] / 2
    radius = np.sqrt((((grid - centre) / centre) ** 2).sum(0))
    mask = radius < 0.8
    sigma = 4 / voxel  # 4 mm of smoothing, in voxels
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    texture = (texture - texture[mask].min()) / np.ptp(texture[mask])
    base = np.where(mask, 300 + 900 * texture, 0).astype(np.float32)
    data = np.empty((*shape, frames), dtype=np.int16)
    for t in range(frames):
        noise = rng.standard_normal(shape, dtype=np.float32) * 0.015 * base
        data[..., t] = np.rint(base + noise).astype(np.int16)
    bold = directory / f"bold_{voxel:g}mm.nii.gz"
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms((voxel, voxel, voxel, 2.0))
    img.to_filename(bold)
    mask_path = directory / f"mask_{voxel:g}mm.nii.gz"
    nib.Nifti1Image(mask.astype(np.uint8), affine).to_filename(mask_path)
    return bold, mask_path


def decompress(bold: Path) -> dict:
    data = np.asarray(nib.load(bold).dataobj)
    return {"checksum": float(data[..., 0].sum())}


def preprocess(bold: Path, mask: Path, cache_root: Path) -> dict:
    # A fresh cache per repeat: nothing is reused.
    run = prepare_run(bold, mask, cache_root / uuid.uuid4().hex, PreprocessParams(window_frames=20))
    return {"frames": run.n_frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for shape, voxel in (((91, 109, 91), 2.0), ((61, 73, 61), 3.0)):
            bold, mask = write_run(root, shape, voxel, args.frames)
            floor = best_of(args.repeats, decompress, bold)
            result = best_of(args.repeats, preprocess, bold, mask, root / f"cache{voxel:g}")
            emit({"benchmark": "preprocess", "grid": "x".join(map(str, shape)),
                  "voxel_mm": voxel, "frames": args.frames, "repeats": args.repeats,
                  "file_mb": bold.stat().st_size / 2**20, "seconds": result["seconds"],
                  "peak_rss_mb": result["peak_rss_mb"], "floor": "nibabel load + decompress",
                  "floor_seconds": floor["seconds"], "floor_peak_rss_mb": floor["peak_rss_mb"],
                  "ratio": result["seconds"] / floor["seconds"],
                  "target_ratio": 1.5 if voxel == 2.0 else None})


if __name__ == "__main__":
    main()
