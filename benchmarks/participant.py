"""Benchmark: one run through the participant level's compute, embeddings only and with attribution.

    python benchmarks/participant.py [--frames 176] [--presets tiny small base]

A 91x109x91 run (176 frames: ADHD-200 at TR 2 s) is brought to the model grid and every window is
embedded, then (second row) attributed to AAL3 regions with ``--attribution-subsets`` passes per window.
Each row runs in a fresh process: seconds and peak RSS are its own. Floor: nibabel load + full
decompression of the run. Targets: peak RSS <= 2.5 GB at ``base`` for a 200-frame run; attribution
<= 10x the embedding-only time (the naive way, one pass per region, costs ~166x); its precision
is the median over regions of the reconstruction error's standard error relative to its value.

Efficiency of the model passes (``model_seconds``, preprocessing excluded): their FLOPs counted by
PyTorch in a second, untimed pass, as TFLOP/s and as a fraction of a 2048^2 float32 matrix
product's rate measured in the same process (of the card's dense bf16 peak on a GPU), and
the bound those operations set when each is replayed alone (``counted_ops_*``:
:func:`_common.counted_ops`).

``--compile`` compiles the passes with ``torch.compile`` (inductor; CPU or GPU) on the plain path
(no background skipping, static shapes); a first, untimed run over the same windows compiles
them, reported apart (``first_run_seconds``: compilation and one run).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from _common import best_of, counted_ops, efficiency, emit, peak_rss_mb

from bidsapp.atlas import load_atlas
from bidsapp.cache import PreprocessParams
from bidsapp.checkpoint import FORMAT, CheckpointMeta
from bidsapp.data import build_region_grid
from bidsapp.demo import make_demo_dataset
from bidsapp.grid import cube_atlas
from bidsapp.inference import RoimaeModel, analyse_run
from bidsapp.model.factory import build_model
from bidsapp.model.presets import PRESETS
from bidsapp.preprocess import prepare_run
from bidsapp.readouts import RegionPooling, dispersion_weights


def make_run(root: Path, frames: int) -> tuple[Path, Path]:
    make_demo_dataset(root / "bids", n_participants=4, n_frames=frames, seed=0)
    bold = next((root / "bids").glob("sub-01/func/*_desc-preproc_bold.nii.gz"))
    return bold, Path(str(bold).replace("desc-preproc_bold", "desc-brain_mask"))


def decompress(bold: Path) -> dict:
    return {"checksum": float(np.asarray(nib.load(bold).dataobj)[..., 0].sum())}


def compile_passes(model: torch.nn.Module) -> None:
    """Compile the passes the participant level runs (``encode_tokens``, the masked forward).

    On the plain path (no background skipping): its shapes are static, as for
    ``pretrain --torch-compile`` (:func:`bidsapp.training.training_network`).
    """
    model.skip_background = False
    model.encode_tokens = torch.compile(model.encode_tokens)
    model.forward = torch.compile(model.forward)


def participant(bold: Path, mask: Path, cache: Path, preset_name: str, attribution: bool,
                subsets: int, compile_model: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[preset_name]
    began = start = time.perf_counter()
    # A fresh cache per row: each row pays for its preprocessing, as a first participant run does;
    # stored at the preset's working resolution, as the participant level stores it.
    run = prepare_run(bold, mask, cache / uuid.uuid4().hex,
                      PreprocessParams(window_frames=20, downsample=preset.downsample))
    prepared = time.perf_counter() - start
    torch.manual_seed(0)
    model = build_model(preset).to(device).eval()
    atlas = load_atlas()
    grid = build_region_grid(atlas, preset).to(device)
    meta = CheckpointMeta.model_validate({
        "format": FORMAT, "epoch": 0, "backbone": preset.backbone, "preset": {"name": preset.name},
        "masking": {"masking": "roi"}, "window_frames": 20,
        "atlas": {"name": atlas.name, "sha256": atlas.sha256(), "n_regions": len(atlas.regions)}})
    cube, token_edge = cube_atlas(atlas), preset.patch_size * preset.downsample
    loaded = RoimaeModel(model, meta, Path("untrained"), "0" * 64, preset, grid,
                         RegionPooling.from_atlas(cube, token_edge).to(device),
                         dispersion_weights(cube, token_edge).to(device), atlas)
    compiled = None
    if compile_model:  # compiled in a first, untimed run of the same passes
        compile_passes(model)
        start = time.perf_counter()
        analyse_run(loaded, run, attribution=attribution, n_subsets=subsets, seed=0)
        compiled = time.perf_counter() - start
    start = time.perf_counter()
    result = analyse_run(loaded, run, attribution=attribution, n_subsets=subsets, seed=0)
    seconds = time.perf_counter() - start
    total = time.perf_counter() - began  # what the row times: not the counting pass below
    peak = peak_rss_mb()  # nor its memory
    if compile_model:  # the counter sees no operation inside a compiled graph: count eagerly
        del model.encode_tokens, model.forward  # the class's methods again, on the plain path
    def passes() -> None:  # counted in a second pass: the counter slows the one it watches
        analyse_run(loaded, run, attribution=attribution, n_subsets=subsets, seed=0)

    ops = counted_ops(passes, device)
    precision = None
    if attribution:  # the median standard error of a region's reconstruction error, relative
        precision = float(np.nanmedian(result.recon_error_se / result.recon_error))
    return {"windows": run.n_windows, "preprocess_seconds": prepared, "model_seconds": seconds,
            "recon_error_relative_se": precision, "efficiency": efficiency(ops, seconds, device),
            "seconds": total, "peak_rss_mb": peak, "compile": compile_model,
            "first_run_seconds": compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=176)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--subsets", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="rows are the fastest of these")
    parser.add_argument("--compile", action="store_true",
                        help="compile the model passes with torch.compile (inductor): an untimed "
                             "first run compiles, its seconds reported as first_run_seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bold, mask = make_run(root, args.frames)
        floor = best_of(args.repeats, decompress, bold)
        for preset in args.presets:
            rows = {}
            for attribution in (False, True):
                rows[attribution] = best_of(args.repeats, participant, bold, mask, root / "cache",
                                            preset, attribution, args.subsets, args.compile)
            for attribution, result in rows.items():
                emit({"benchmark": "participant", "preset": preset, "frames": args.frames,
                      "attribution": attribution, "subsets": args.subsets if attribution else 0,
                      "windows": result["windows"], "seconds": result["seconds"],
                      "model_seconds": result["model_seconds"], "compile": args.compile,
                      "first_run_seconds": result["first_run_seconds"],
                      "preprocess_seconds": result["preprocess_seconds"],
                      "peak_rss_mb": result["peak_rss_mb"], "repeats": args.repeats,
                      "recon_error_relative_se": result["recon_error_relative_se"],
                      **result["efficiency"],
                      "floor": "nibabel load + decompress",
                      "floor_seconds": floor["seconds"],
                      "ratio": result["seconds"] / floor["seconds"],
                      "attribution_over_embedding": (rows[True]["model_seconds"]
                                                     / rows[False]["model_seconds"])
                      if attribution else None})


if __name__ == "__main__":
    main()
