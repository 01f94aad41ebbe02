"""From discovered BOLD runs to model inputs: the cache, the participant split and the region grid."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bidsapp.atlas import Atlas
from bidsapp.bids.layout import BoldRun
from bidsapp.cache import CachedRun, PreprocessParams, load_cached
from bidsapp.config import Config
from bidsapp.grid import cube_atlas
from bidsapp.logs import get_logger
from bidsapp.model.presets import ModelPreset
from bidsapp.model.regions import RegionGrid, downsample_labels
from bidsapp.preprocess import prepare_run

log = get_logger("data")


def _prepare(run: BoldRun, cache_root: Path, params: PreprocessParams) -> Path:
    return prepare_run(run.bold, run.mask, cache_root, params, run.repetition_time).directory


def prepare_runs(config: Config, runs: Sequence[BoldRun], params: PreprocessParams
                 ) -> list[CachedRun]:
    """Bring every run to the model grid once (cached in the work directory), ``--nprocs`` at a time.

    ``params``: the model's preprocessing (:meth:`bidsapp.inference.RoimaeModel.preprocess_params`,
    or the pretrain level's from the command line), so that runs are stored at its working
    resolution.
    """
    cache_root = config.work_dir / "cache"
    if config.nprocs <= 1 or len(runs) <= 1:
        directories = [_prepare(run, cache_root, params) for run in runs]
    else:
        # spawn, not fork: forking a process that already started PyTorch threads can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=config.nprocs, mp_context=context) as pool:
            directories = list(pool.map(_prepare, runs, [cache_root] * len(runs),
                                        [params] * len(runs)))
    return [load_cached(directory) for directory in directories]


def split_participants(subjects: Sequence[str], val_fraction: float,
                       seed: int) -> tuple[list[str], list[str]]:
    """Hold out a seeded random ``val_fraction`` of participants (at least one when there are two or more).

    Splitting by participant, not by window, keeps windows of one person out of both sets.
    """
    unique = sorted(set(subjects))
    n_val = round(val_fraction * len(unique))
    if val_fraction > 0 and len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    val = sorted(unique[i] for i in order[:n_val])
    train = sorted(set(unique) - set(val))
    return train, val


def build_region_grid(atlas: Atlas, preset: ModelPreset) -> RegionGrid:
    """The atlas regions on the preset's working grid and token grid (contiguous ids, -1 = none)."""
    cube = cube_atlas(atlas)
    labels, brain = downsample_labels(cube.voxel_labels, cube.brain, preset.downsample)
    grid = RegionGrid.from_labels(torch.from_numpy(labels.astype(np.int64)),
                                  torch.from_numpy(brain), preset.patch_size, len(atlas.regions))
    missing = [atlas.regions[i].name for i in grid.regions_without_tokens()]
    if missing:
        log.info("%d of %d %s regions own no token of the %s grid (patch %d at %dx downsampling) "
                 "and cannot be hidden by roi masking (attribution hides them voxel by voxel): %s",
                 len(missing), grid.n_regions, atlas.name, preset.name, preset.patch_size,
                 preset.downsample, ", ".join(missing))
    return grid
