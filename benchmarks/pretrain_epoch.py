"""Benchmark: seconds per training window of real pretraining epochs on cached datasets of N runs.

    python benchmarks/pretrain_epoch.py [--runs 10 100 1000] [--steps 20] [--preset tiny] [--cold]
    python benchmarks/pretrain_epoch.py --bids DIR [--steps 0] [--preset tiny]

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

With ``--bids DIR`` the runs are those of a real fMRIPrep-style derivatives dataset instead
(``sub-*/**/func/*_desc-preproc_bold.nii.gz`` beside their ``desc-brain_mask``; for instance one
that ``make_pseudovolumes.py`` of ``../shared/realdata/development_fmri`` writes), preprocessed into
a cache as the pretrain level does (``cache_write_seconds``), split by participant; ``--steps 0``
covers every training and held-out window per epoch, as ``pretrain`` does (one row).

Rows (JSON, one per size): ``seconds_per_window`` (training pass / training windows),
``epoch_seconds_per_window`` (training and held-out passes / training windows),
``floor_seconds_per_window``, their ratio, ``peak_rss_mb`` of the child process after the epochs
(before the floor's batches are held in memory) and the cache size on disk. Where the time beyond
the floor goes, per training window (each the fastest of the rounds):
``trainer_in_memory_seconds_per_window`` (the Trainer's epoch on the floor's batches in memory:
its per-step work beyond the floor's, such as gradient clipping and the masked fraction),
``load_seconds_per_window`` (a pass over the training loader alone: cache reads and batching),
``held_out_seconds_per_window`` and ``epoch_end_seconds`` (what the pretrain level does after
each epoch: training log, checkpoint with the optimizer state, pruning, loss curve);
``pretrain_epoch_seconds_per_window`` sums the passes and the epoch's end, and
``pretrain_epoch_ratio`` divides it by the floor.
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


def bids_runs(bids: Path) -> list[tuple[Path, Path, str]]:
    """``(bold, mask, participant)`` of every preprocessed run under ``bids`` with a brain mask."""
    runs = []
    for bold in sorted(bids.glob("sub-*/**/func/*_desc-preproc_bold.nii.gz")):
        mask = bold.with_name(bold.name.replace("desc-preproc_bold", "desc-brain_mask"))
        if mask.is_file():
            runs.append((bold, mask, bold.name.split("_")[0].removeprefix("sub-")))
    return runs


def cache_bids(bids: Path, root: Path, window: int, downsample: int) -> tuple[list[Path], list[str]]:
    """Preprocess the runs of ``bids`` into a cache under ``root`` (as the pretrain level does);
    the entries' directories and each run's participant."""
    from bidsapp.cache import PreprocessParams
    from bidsapp.preprocess import prepare_run

    params = PreprocessParams(window_frames=window, downsample=downsample)
    found = bids_runs(bids)
    return ([prepare_run(bold, mask, root, params).directory for bold, mask, _ in found],
            [subject for _, _, subject in found])


def epoch_end(trainer, history, meta, out_dir: Path, epoch: int, seconds: float) -> float:
    """Seconds of what :mod:`bidsapp.pretrain` does after an epoch (its ``_epoch_saver``): the
    training log, the checkpoint with the optimizer state, pruning and the loss curve."""
    from bidsapp.checkpoint import prune_checkpoints, save_checkpoint
    from bidsapp.pretrain import EPOCH_CHECKPOINT, KEEP_CHECKPOINTS
    from bidsapp.reports import plot_loss_curve
    from bidsapp.training import EpochMetrics

    start = time.perf_counter()
    metrics = EpochMetrics(epoch, 1.0, 1.0, 0.5, 1e-4, seconds)
    history.add(metrics)
    history.write(out_dir / "training_log.tsv")
    save_checkpoint(out_dir / EPOCH_CHECKPOINT.format(epoch=epoch), trainer.model,
                    meta.model_copy(update={"epoch": epoch, "metrics": metrics.as_row()}),
                    trainer.optimizer)
    prune_checkpoints(out_dir, KEEP_CHECKPOINTS)
    plot_loss_curve(history.frame, out_dir / "loss_curve.png", "benchmark")
    return time.perf_counter() - start


def epochs(directories: list[Path], subjects: list[str], out_dir: Path,
           args: argparse.Namespace) -> dict:
    """In a spawned child: open the entries, build the Trainer, time epochs and the floor.

    ``subjects`` holds each run's participant; checkpoints are written to ``out_dir``.
    """
    from torch.utils.data import DataLoader

    from bidsapp.atlas import load_atlas
    from bidsapp.cache import load_cached
    from bidsapp.checkpoint import FORMAT, CheckpointMeta
    from bidsapp.data import build_region_grid, split_participants
    from bidsapp.distributed import DistributedContext
    from bidsapp.model.factory import build_model
    from bidsapp.model.masking import build_masking
    from bidsapp.model.presets import PRESETS
    from bidsapp.runtime import seed_everything
    from bidsapp.training import Trainer, TrainingHistory, TrainingSettings
    from bidsapp.windows import WindowDataset, collate_windows

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = [load_cached(directory) for directory in directories]
    train_subjects, val_subjects = split_participants(subjects, args.val_fraction, 0)
    val = set(val_subjects)
    rng = np.random.default_rng(0)

    def windows(held_out: bool, n: int) -> list[tuple[int, int]]:
        pool = [(r, w) for r, run in enumerate(runs) if (subjects[r] in val) == held_out
                for w in range(run.n_windows)]
        if not n:  # --steps 0: all of them, as the pretrain level's epochs
            return pool
        return [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]

    train_idx = windows(False, args.steps * args.batch_size)
    n_train = len(train_idx)
    share = len(val_subjects) / max(len(train_subjects), 1)
    val_idx = (windows(True, args.steps and max(1, round(n_train * share)))
               if val_subjects else [])
    floor_steps = args.steps or min(10, -(-n_train // args.batch_size))
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
    atlas_info = {"name": atlas.name, "sha256": atlas.sha256(), "n_regions": len(atlas.regions)}
    meta = CheckpointMeta.model_validate({
        "format": FORMAT, "epoch": 0, "backbone": preset.backbone, "preset": {"name": preset.name},
        "masking": {"masking": args.masking}, "window_frames": args.window_frames,
        "atlas": atlas_info})
    history = TrainingHistory()
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.train_epoch(1)  # warm-up: first allocations, kernels, page cache of the windows
    trainer.evaluate()
    epoch_end(trainer, history, meta, out_dir, 1, 0.0)  # imports, the first figure
    # In memory: a few of the same batches (all of them at full resolution would cost GBs).
    batches = None
    train_s = val_s = floor_s = memory_s = load_s = end_s = float("inf")
    rss = 0.0
    loader = trainer.train_loader
    for epoch in range(2, 2 + args.rounds):
        if args.cold:
            drop_page_cache()
        start = time.perf_counter()
        trainer.train_epoch(epoch)
        middle = time.perf_counter()
        trainer.evaluate()
        train_s, val_s = min(train_s, middle - start), min(val_s, time.perf_counter() - middle)
        end_s = min(end_s, epoch_end(trainer, history, meta, out_dir, epoch,
                                     time.perf_counter() - start))
        rss = max(rss, peak_rss_mb())
        start = time.perf_counter()
        for _ in loader:  # the training loader alone, same windows (another order)
            pass
        load_s = min(load_s, time.perf_counter() - start)
        if batches is None:
            batches = list(itertools.islice(DataLoader(WindowDataset(runs, train_idx),
                                                       batch_size=args.batch_size,
                                                       collate_fn=collate_windows), 4))
        floor_s = min(floor_s, step_seconds(model, masking, trainer.optimizer,
                                            itertools.cycle(batches), device, floor_steps))
        # The Trainer's own epoch on those batches in memory (as many steps as from the loader).
        trainer.train_loader = list(itertools.islice(itertools.cycle(batches), len(loader)))
        start = time.perf_counter()
        trainer.train_epoch(epoch)
        memory_s = min(memory_s, time.perf_counter() - start)
        trainer.train_loader = loader
    per_window = train_s / n_train
    floor = floor_s / args.batch_size
    pretrain_epoch = (train_s + val_s + end_s) / n_train
    return {"device": device.type, "runs": len(runs), "train_runs": len(train_subjects),
            "held_out_runs": len(val_subjects), "train_windows": len(train_idx),
            "held_out_windows": len(val_idx), "input_shape": list(runs[0].shape),
            "seconds_per_window": per_window,
            "epoch_seconds_per_window": (train_s + val_s) / n_train,
            "floor": "same model steps, batches in memory (median)",
            "floor_seconds_per_window": floor, "ratio": per_window / floor,
            "trainer_in_memory_seconds_per_window": memory_s / n_train,
            "load_seconds_per_window": load_s / n_train,
            "held_out_seconds_per_window": val_s / n_train, "epoch_end_seconds": end_s,
            "pretrain_epoch_seconds_per_window": pretrain_epoch,
            "pretrain_epoch_ratio": pretrain_epoch / floor, "peak_rss_mb_epochs": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--steps", type=int, default=20,
                        help="training batches per epoch (0: every training window)")
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
                        help="where the caches are written (default: a temporary one)")
    parser.add_argument("--bids", type=Path, default=None,
                        help="time epochs on the runs of this fMRIPrep-style derivatives dataset "
                             "(preprocessed into a cache first) instead of synthetic caches")
    args = parser.parse_args()
    if args.cold:
        try:
            drop_page_cache()
        except OSError as exc:
            parser.error(f"--cold cannot empty the page cache: {exc}")
    if args.bids is not None and not bids_runs(args.bids):
        parser.error(f"--bids: no *_desc-preproc_bold.nii.gz with a desc-brain_mask in {args.bids}")
    from bidsapp.model.presets import PRESETS

    downsample = args.downsample or PRESETS[args.preset].downsample
    common = {"benchmark": "pretrain-epoch", "preset": args.preset, "masking": args.masking,
              "downsample": downsample, "batch": args.batch_size,
              "frames_per_window": args.window_frames, "steps": args.steps,
              "rounds": args.rounds, "loader_workers": args.workers,
              "page_cache": "emptied before each timed epoch" if args.cold else "warm"}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        if args.bids is not None:
            root = Path(tmp) / "cache"
            start = time.perf_counter()
            directories, subjects = cache_bids(args.bids, root, args.window_frames, downsample)
            written = time.perf_counter() - start
            result = in_child(epochs, directories, subjects, Path(tmp) / "model", args)
            emit({**common, **result, **cache_size(root, len(directories)),
                  "cache_write_seconds": written,
                  "cache": f"preprocessed from {args.bids.name} ({len(set(subjects))} participants)"})
            return
        for n_runs in args.runs:
            root = Path(tmp) / f"cache-{n_runs}"
            start = time.perf_counter()
            directories = write_cache(root, n_runs, args.frames, args.window_frames, downsample,
                                      seed=n_runs)
            written = time.perf_counter() - start
            sizes = cache_size(root, n_runs)
            subjects = [f"{i:05d}" for i in range(n_runs)]  # one participant per run
            result = in_child(epochs, directories, subjects, root / "model", args)
            emit({**common, "frames_per_run": args.frames, **result, **sizes,
                  "cache_write_seconds": written, "cache": "synthetic, written directly"})
            shutil.rmtree(root)


def cache_size(root: Path, n_runs: int) -> dict[str, float]:
    """Size on disk of the cache under ``root``, in all and per run (MiB)."""
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {"cache_mb": size / 2**20, "cache_mb_per_run": size / 2**20 / n_runs}


if __name__ == "__main__":
    main()
