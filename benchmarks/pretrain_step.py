"""Benchmark: seconds per pretraining step, with the real cached loader and with the batch in memory.

    python benchmarks/pretrain_step.py [--presets tiny small] [--maskings roi random] [--steps 6]

The loader reads windows from the memory-mapped cache, stored at the preset's working resolution
(as ``pretrain`` does); the floor is the same
model steps on the same batches already in memory. The two alternate for ``--rounds`` and each
keeps its fastest round (the median of its steps). Target: loader step <= 1.1x in-memory step.

Efficiency: the FLOPs of one step (counted by PyTorch, :func:`_common.counted_ops`) over the
in-memory step's seconds, as TFLOP/s and as a fraction of a peak: on the CPU the rate of a 2048^2
float32 matrix product measured in the same process, on a GPU the card's dense bf16 peak; and
the bound set by the step's own matrix products and attention, each replayed alone on its
arguments (``counted_ops_*``: :func:`_common.counted_ops`).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch
from _common import emit, step_efficiency, step_seconds


def prepare(root: Path, frames: int, window: int, downsample: int):
    from bidsapp.atlas import load_atlas
    from bidsapp.cache import PreprocessParams
    from bidsapp.demo import make_demo_dataset
    from bidsapp.preprocess import prepare_run

    bids = root / "bids"
    if not bids.exists():
        make_demo_dataset(bids, n_participants=4, n_frames=frames, seed=0)
    runs = [prepare_run(b, Path(str(b).replace("desc-preproc_bold", "desc-brain_mask")),
                        root / "cache", PreprocessParams(window_frames=window,
                                                         downsample=downsample))
            for b in sorted(bids.glob("sub-*/func/*_desc-preproc_bold.nii.gz"))]
    return runs, load_atlas()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--maskings", nargs="+", default=["roi", "random"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--window-frames", type=int, default=20)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round (median)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes (pretrain uses --nprocs - 1)")
    args = parser.parse_args()
    from torch.utils.data import DataLoader

    from bidsapp.data import build_region_grid
    from bidsapp.model.factory import build_model
    from bidsapp.model.masking import build_masking
    from bidsapp.model.presets import PRESETS
    from bidsapp.windows import WindowDataset, collate_windows

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for preset_name, masking_name in itertools.product(args.presets, args.maskings):
            preset = PRESETS[preset_name]
            runs, atlas = prepare(Path(tmp), args.window_frames * 3, args.window_frames,
                                  preset.downsample)  # reused once cached
            dataset = WindowDataset(runs)
            torch.manual_seed(0)
            model = build_model(preset).to(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            grid = build_region_grid(atlas, preset).to(device)
            masking = build_masking(masking_name, grid, 0.5)
            # In order, so that every pass over the loader yields the same batches.
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                collate_fn=collate_windows,
                                num_workers=args.workers, pin_memory=device.type == "cuda",
                                persistent_workers=args.workers > 0)
            # The floor steps through the very batches the loader yields, already in memory.
            batches = list(loader)
            batch = batches[0]
            # Alternate the two, and keep each one's fastest round: load from other processes
            # on the machine then biases neither.
            in_memory, loaded = float("inf"), float("inf")
            for _ in range(args.rounds):
                in_memory = min(in_memory, step_seconds(model, masking, optimizer,
                                                        itertools.cycle(batches), device, args.steps))
                # A new pass over the loader whenever it is exhausted: every batch is loaded.
                reloaded = itertools.chain.from_iterable(itertools.repeat(loader))
                loaded = min(loaded, step_seconds(model, masking, optimizer, reloaded, device,
                                                  args.steps))
            row = {"benchmark": "pretrain-step", "preset": preset_name, "masking": masking_name,
                   "device": device.type, "batch": args.batch_size,
                   "frames": args.window_frames, "loader_workers": args.workers,
                   "steps": args.steps, "rounds": args.rounds,
                   "seconds_per_step": loaded, "samples_per_second": args.batch_size / loaded,
                   "floor": "same steps, batches in memory", "floor_seconds": in_memory,
                   "ratio": loaded / in_memory, "target_ratio": 1.1,
                   **step_efficiency(model, masking, batch, device, in_memory)}
            emit(row)


if __name__ == "__main__":
    main()
