"""Benchmark: what a cache stored at the working resolution keeps, and its size.

    python benchmarks/cache_precision.py [--frames 176] [--downsample 2]

One demo run (:func:`bidsapp.demo.make_demo_dataset`) is cached three ways: float16 on the 2 mm
cube (the layout before the cache stored the working resolution: the model pooled float16 values
in float32), float16 pooled at ``--downsample`` (pooled in float32 while preprocessing, then
stored) and float32 on the cube (the reference). The row gives the model inputs' differences
over the support cells (max and RMS absolute, z-score units) of each float16 path from the
reference and from each other, the functional-connectivity baseline of the cube and of the
downsampled cache (max and mean absolute difference of the Fisher z of the AAL3 correlation
matrices), the size of each entry, and the seconds to build one window's model input from each
float16 entry (``run.window`` then, for the cube, the model's pooling), the mean over the run's
windows, both measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=176)
    parser.add_argument("--downsample", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from bidsapp.atlas import load_atlas
    from bidsapp.cache import PreprocessParams
    from bidsapp.demo import make_demo_dataset
    from bidsapp.grid import cube_atlas
    from bidsapp.preprocess import prepare_run
    from bidsapp.readouts import correlation_matrix, region_timeseries, vectorize

    s = args.downsample
    with tempfile.TemporaryDirectory() as tmp:
        bids = Path(tmp) / "bids"
        make_demo_dataset(bids, n_participants=4, n_frames=args.frames, seed=args.seed)
        bold = sorted(bids.glob("sub-*/func/*_desc-preproc_bold.nii.gz"))[0]
        mask = Path(str(bold).replace("desc-preproc_bold", "desc-brain_mask"))

        def cache(**params):
            return prepare_run(bold, mask, Path(tmp) / "cache",
                               PreprocessParams(window_frames=20, **params))

        full, pooled, exact = cache(), cache(downsample=s), cache(dtype="float32")

        def pool(run) -> np.ndarray:  # what the model's prepare computes: float32 avg_pool3d
            return F.avg_pool3d(torch.from_numpy(run.frames(0, run.n_frames)), s).numpy()

        support = pooled.cell_voxels() > 0
        old, new, reference = (a[:, support] for a in (pool(full), pooled.frames(0, args.frames),
                                                       pool(exact)))

        def diff(a: np.ndarray, b: np.ndarray) -> dict:
            d = np.abs(a.astype(np.float64) - b)
            return {"max": float(d.max()), "rms": float(np.sqrt((d**2).mean()))}

        cube = cube_atlas(load_atlas())
        fisher = [vectorize(correlation_matrix(region_timeseries(run, cube)))
                  for run in (full, pooled)]
        both = np.isfinite(fisher[0]) & np.isfinite(fisher[1])
        dz = np.abs(fisher[0][both] - fisher[1][both])

        def window_seconds(run, pooling: bool) -> float:
            start = time.perf_counter()
            for w in range(run.n_windows):
                x = torch.from_numpy(run.window(w))
                if pooling:
                    F.avg_pool3d(x, s)
            return (time.perf_counter() - start) / run.n_windows

        def megabytes(run) -> float:
            return sum(f.stat().st_size for f in run.directory.iterdir()) / 2**20

        emit({"benchmark": "cache-precision", "frames": args.frames, "downsample": s,
              "support_cells": int(support.sum()), "brain_cells": int(pooled.brain.sum()),
              "cube_brain_voxels": int(full.brain.sum()),
              "input_float16_pooled_vs_float32": diff(new, reference),
              "input_float16_cube_then_pooled_vs_float32": diff(old, reference),
              "input_float16_pooled_vs_float16_cube_then_pooled": diff(new, old),
              "input_abs_max": float(np.abs(reference).max()),
              "input_rms": float(np.sqrt((reference.astype(np.float64)**2).mean())),
              "fc_edges": int(both.sum()),
              "fc_fisher_z_max_abs_diff": float(dz.max()),
              "fc_fisher_z_mean_abs_diff": float(dz.mean()),
              "fc_fisher_z_correlation": float(np.corrcoef(fisher[0][both], fisher[1][both])[0, 1]),
              "fc_fisher_z_abs_max": float(np.abs(fisher[0][both]).max()),
              "cache_mb_cube_float16": megabytes(full),
              "cache_mb_pooled_float16": megabytes(pooled),
              "window_input_seconds_cube": window_seconds(full, True),
              "window_input_seconds_pooled": window_seconds(pooled, False)})


if __name__ == "__main__":
    main()
