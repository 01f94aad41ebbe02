"""Benchmark: seconds per training window of real pretraining epochs on cached datasets of N runs.

    python benchmarks/pretrain_epoch.py [--runs 10 100 1000] [--steps 20] [--preset tiny] [--cold]

For every size N, a synthetic cache of N runs (``--frames`` 176 per run, one participant each) is
written *directly in the cache format* (:func:`bidsapp.preprocess.write_entry`), with random
z-scores on the brain of the atlas template, at the preset's working resolution (``--downsample``
to store another one, 1 for the full 2 mm cube): preprocessing N NIfTI files would take longer than
the epochs. A fresh spawned process then opens the N entries (as the pretrain level does), splits
participants (``--val-fraction``) and builds the :class:`bidsapp.training.Trainer` over
:class:`bidsapp.windows.WindowDataset` with its real sampler and DataLoader. So that every size
costs the same time, the epoch covers ``--steps`` batches: that many training windows drawn at
random (seeded) among all training runs' windows, and held-out windows in the same proportion as
the runs. One untimed epoch warms up, then ``--rounds`` timed epochs (training pass and held-out
pass, each timed; with ``--cold`` the page cache is emptied before each) alternate with the floor:
the same model steps on the same training windows' batches already in memory
(:func:`_common.step_seconds`, median). Each keeps its fastest round.

Rows (JSON, one per size): ``seconds_per_window`` (training pass / training windows),
``epoch_seconds_per_window`` (training and held-out passes / training windows),
``floor_seconds_per_window``, their ratio, ``peak_rss_mb`` of the child process after the epochs
(before the floor's batches are held in memory) and the cache size on disk.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from _common import emit, in_child, peak_rss_mb, step_seconds


def write_cache(root: Path, n_runs: int, frames: int, window: int, downsample: int,
                seed: int) -> list[Path]:
    """``n_runs`` synthetic cache entries under ``root``; their directories."""
    from bidsapp._version import __version__
    from bidsapp.atlas import load_atlas
    from bidsapp.cache import CACHE_FORMAT, PreprocessParams, write_entry
    from bidsapp.grid import cube_atlas
    from bidsapp.preprocess import CHUNK_FRAMES, cell_counts

    params = PreprocessParams(window_frames=window, downsample=downsample)
    cube_brain = cube_atlas(load_atlas()).brain
    voxels, brain = cell_counts(cube_brain, downsample)
    n_support = int((voxels > 0).sum())
    rng = np.random.default_rng(seed)
    directories = []
    for i in range(n_runs):
        directory = root / f"run-{i:05d}"
        directory.mkdir(parents=True)
        rows = (rng.standard_normal((min(CHUNK_FRAMES, frames - start), n_support),
                                    dtype=np.float32)
                for start in range(0, frames, CHUNK_FRAMES))
        manifest = {"key": f"synthetic-{i}", "format": CACHE_FORMAT,
                    "source": f"synthetic-{i}", "source_sha256": "0" * 64,
                    "mask": "synthetic", "mask_sha256": "0" * 64, "params": params.key(),
                    "n_frames": frames, "repetition_time": 2.0, "source_repetition_time": 2.0,
                    "n_windows": frames // window, "n_brain": int(cube_brain.sum()),
                    "n_support": n_support, "spatially_resampled": False,
                    "normalization": {"mean": 0.0, "std": 1.0},
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "roimae_version": __version__}
        write_entry(directory, rows, (frames, n_support), params.dtype, brain, voxels, manifest)
        directories.append(directory)
    return directories


def drop_page_cache() -> None:
    """Write dirty pages and empty the kernel's page cache (root on Linux only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def epochs(directories: list[Path], args: argparse.Namespace) -> dict:
    """In a spawned child: open the entries, build the Trainer, time epochs and the floor."""
    from torch.utils.data import DataLoader

    from bidsapp.atlas import load_atlas
    from bidsapp.cache import load_cached
    from bidsapp.data import build_region_grid, split_participants
    from bidsapp.distributed import DistributedContext
    from bidsapp.model.factory import build_model
    from bidsapp.model.masking import build_masking
    from bidsapp.model.presets import PRESETS
    from bidsapp.runtime import seed_everything
    from bidsapp.training import Trainer, TrainingSettings
    from bidsapp.windows import WindowDataset, collate_windows

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = [load_cached(directory) for directory in directories]
    subjects = [f"{i:05d}" for i in range(len(runs))]
    train_subjects, val_subjects = split_participants(subjects, args.val_fraction, 0)
    val = set(val_subjects)
    rng = np.random.default_rng(0)

    def windows(held_out: bool, n: int) -> list[tuple[int, int]]:
        pool = [(r, w) for r, run in enumerate(runs) if (subjects[r] in val) == held_out
                for w in range(run.n_windows)]
        return [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]

    n_train = args.steps * args.batch_size
    train_idx = windows(False, n_train)
    share = len(val_subjects) / max(len(train_subjects), 1)
    val_idx = windows(True, max(1, round(n_train * share))) if val_subjects else []
    preset = PRESETS[args.preset]
    atlas = load_atlas()
    grid = build_region_grid(atlas, preset).to(device)
    masking = build_masking(args.masking, grid, 0.5)
    seed_everything(0)
    model = build_model(preset)
    settings = TrainingSettings(seed=0, epochs=1 + args.rounds, batch_size=args.batch_size,
                                lr=1e-4, weight_decay=0.05, warmup_epochs=0, clip_grad=1.0,
                                num_workers=args.workers)
    trainer = Trainer(model, masking, WindowDataset(runs, train_idx),
                      WindowDataset(runs, val_idx) if val_idx else None,
                      ctx=DistributedContext(rank=0, world_size=1, device=device),
                      settings=settings)
    trainer.train_epoch(1)  # warm-up: first allocations, kernels, page cache of the windows
    trainer.evaluate()
    # In memory: a few of the same batches (all of them at full resolution would cost GBs).
    batches = None
    train_s = val_s = floor_s = float("inf")
    rss = 0.0
    for epoch in range(2, 2 + args.rounds):
        if args.cold:
            drop_page_cache()
        start = time.perf_counter()
        trainer.train_epoch(epoch)
        middle = time.perf_counter()
        trainer.evaluate()
        train_s, val_s = min(train_s, middle - start), min(val_s, time.perf_counter() - middle)
        rss = max(rss, peak_rss_mb())
        if batches is None:
            loader = DataLoader(WindowDataset(runs, train_idx), batch_size=args.batch_size,
                                collate_fn=collate_windows)
            batches = list(itertools.islice(loader, 4))
        floor_s = min(floor_s, step_seconds(model, masking, trainer.optimizer,
                                            itertools.cycle(batches), device, args.steps))
    per_window = train_s / n_train
    floor = floor_s / args.batch_size
    return {"device": device.type, "runs": len(runs), "train_runs": len(train_subjects),
            "held_out_runs": len(val_subjects), "train_windows": len(train_idx),
            "held_out_windows": len(val_idx), "input_shape": list(runs[0].shape),
            "seconds_per_window": per_window,
            "epoch_seconds_per_window": (train_s + val_s) / n_train,
            "floor": "same model steps, batches in memory (median)",
            "floor_seconds_per_window": floor, "ratio": per_window / floor,
            "peak_rss_mb_epochs": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--steps", type=int, default=20, help="training batches per epoch")
    parser.add_argument("--rounds", type=int, default=2, help="timed epochs (fastest kept)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--masking", default="roi")
    parser.add_argument("--downsample", type=int, default=None,
                        help="cache resolution (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--window-frames", type=int, default=20)
    parser.add_argument("--frames", type=int, default=176, help="frames per run")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--cold", action="store_true",
                        help="empty the page cache before each timed epoch (needs root on Linux): "
                             "every window is read from the disk, as from a cache larger than "
                             "memory")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the synthetic caches are written (default: a temporary one)")
    args = parser.parse_args()
    if args.cold:
        try:
            drop_page_cache()
        except OSError as exc:
            parser.error(f"--cold cannot empty the page cache: {exc}")
    from bidsapp.model.presets import PRESETS

    downsample = args.downsample or PRESETS[args.preset].downsample
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        for n_runs in args.runs:
            root = Path(tmp) / f"cache-{n_runs}"
            start = time.perf_counter()
            directories = write_cache(root, n_runs, args.frames, args.window_frames, downsample,
                                      seed=n_runs)
            written = time.perf_counter() - start
            size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
            result = in_child(epochs, directories, args)
            emit({"benchmark": "pretrain-epoch", "preset": args.preset, "masking": args.masking,
                  "downsample": downsample, "batch": args.batch_size,
                  "frames_per_window": args.window_frames, "frames_per_run": args.frames,
                  "steps": args.steps, "rounds": args.rounds, "loader_workers": args.workers,
                  "page_cache": "emptied before each timed epoch" if args.cold else "warm",
                  **result, "cache_mb": size / 2**20, "cache_mb_per_run": size / 2**20 / n_runs,
                  "cache_write_seconds": written, "cache": "synthetic, written directly"})
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
