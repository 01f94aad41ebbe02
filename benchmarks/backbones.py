"""Benchmark: seconds per training step of each backbone, relative to swin4d at the same preset.

    python benchmarks/backbones.py [--presets tiny small] [--backbones swin4d swin4d-plain vit4d]
                                   [--batch-size 2] [--frames 20] [--steps 3] [--compile]
                                   [--cpu-bf16] [--threads N]
    torchrun --standalone --nproc-per-node 2 benchmarks/backbones.py --backbones swin4d

A step is what the pretrain level does per batch (mask draw, forward, backward, AdamW) on windows
of noise in the AAL3 brain (0 outside, as the cache gives), with ``roi`` masking at 50% of the
regions, through the module the pretrain level trains (:func:`bidsapp.training.training_network`:
compiled with ``--compile`` as ``--torch-compile`` does, in DistributedDataParallel under
torchrun; in bf16 autocast on the CPU too with ``--cpu-bf16``, as ``pretrain --cpu-bf16``).
``swin4d-plain`` is swin4d without background skipping; ``neurostorm`` is NeuroSTORM's
MAE at its released size (its one preset, ``released``, stands in for ``base`` and vice versa, so
``--presets base --backbones swin4d neurostorm`` compares the two). The visible-token fraction is
the share of the cube's tokens (all frames) that the encoder processes. Every measurement runs in
a fresh process; with ``--repeats`` the backbones are measured in turn and each row gives the
median (the ratio to swin4d is of medians). CUDA with bf16 autocast when available, else the CPU.
Every row gives the FLOPs of a step (or forward pass), counted by PyTorch (matrix products and
attention; not elementwise work such as Mamba's selective scan), TFLOP/s and their fraction of a
peak: a 2048^2 float32 matrix product measured in the same process on the CPU, the card's dense
bf16 peak on CUDA (:func:`_common.efficiency`). Under torchrun every
rank measures in its own process and rank 0 prints the rows (``world_size``; samples/s counts
every rank's batch). ``first_step_seconds`` is the first step alone, before the warm-up: with
``--compile``, the compilation (inductor, on the CPU too) is in it and not in the timed steps.

    python benchmarks/backbones.py --forward [--frames 20] [--steps 2] [--threads 1]

``--forward`` instead times one forward pass without gradients of one 96^3 window (batch 1) at the
base size, each in a fresh process (on CUDA with bf16 autocast when there is a GPU, else the CPU):
roimae's ``swin4d`` ``base`` encoder (``encode``, background skipping on) and masked autoencoder
(``roi`` masking at 50%), beside the released SwiFT encoder and the released NeuroSTORM encoder and
MAE (window masking at 50%, then its decoder), rewritten in plain PyTorch
(:mod:`bidsapp.model.upstream`). ``ratio_to_swin4d`` compares an encoder with swin4d's encoder and
an autoencoder with swin4d's.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
from _common import (
    counted_ops,
    efficiency,
    emit,
    in_child,
    peak_rss_mb,
    step_efficiency,
    step_seconds,
)

from bidsapp.distributed import env_rank, env_world_size


def measure(backbone: str, preset_name: str, batch: int, frames: int, steps: int,
            warmup: int, compile_model: bool = False, cpu_bf16: bool = False,
            threads: int | None = None) -> dict:
    from bidsapp.atlas import load_atlas
    from bidsapp.data import build_region_grid
    from bidsapp.distributed import DistributedContext
    from bidsapp.grid import cube_atlas
    from bidsapp.model.factory import build_model, count_parameters
    from bidsapp.model.masking import build_masking
    from bidsapp.training import training_network

    if threads:
        torch.set_num_threads(threads)
    ctx = DistributedContext.setup(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = ctx.device
    preset = backbone_preset(backbone, preset_name)
    atlas = load_atlas()
    torch.manual_seed(ctx.rank)
    brain = torch.from_numpy(cube_atlas(atlas).brain).to(device).expand(batch, -1, -1, -1)
    x = torch.randn(batch, frames, 96, 96, 96, device=device) * brain[:, None]
    masking = build_masking("roi", build_region_grid(atlas, preset).to(device), 0.5)
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP expects
    model = build_model(preset).to(device)
    if backbone == "swin4d-plain":
        model.skip_background = False
    network = training_network(model, ctx, compile_model=compile_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    encoded: list[float] = []
    if preset.backbone == "vit4d":  # the encoder's valid tokens, per sample
        model.encoder.register_forward_hook(
            lambda _m, args, _out: encoded.append(args[1].sum().item() / batch))
    n_tokens = frames * torch.tensor(preset.grid_shape()).prod().item() / preset.tubelet
    batches = itertools.repeat({"x": x, "brain": brain})
    # The first step alone, before the warm-up: with --compile, it compiles (reported apart).
    first = step_seconds(network, masking, optimizer, batches, device, steps=1, warmup=0,
                         cpu_bf16=cpu_bf16)
    seconds = step_seconds(network, masking, optimizer, batches, device, steps, warmup,
                           cpu_bf16=cpu_bf16)
    world = ctx.world_size
    ctx.shutdown()
    peak = peak_rss_mb()  # before the counting pass below
    return {"benchmark": "backbone-step", "peak_rss_mb": peak, "backbone": backbone,
            "preset": preset.name,
            "device": device.type, "batch": batch, "frames": frames,
            "compile": compile_model, "cpu_bf16": cpu_bf16, "threads": torch.get_num_threads(),
            "world_size": world,
            "seconds_per_step": seconds, "samples_per_second": batch * world / seconds,
            "first_step_seconds": first,
            "n_parameters": count_parameters(preset),
            "visible_token_fraction": sum(encoded) / len(encoded) / n_tokens if encoded else 1.0,
            "steps": steps, "warmup": warmup,
            # Counted on the module itself: a compiled graph hides its operations from the counter
            # (its FLOPs are the plain path's, which compiling selects).
            **step_efficiency(model, masking, {"x": x, "brain": brain}, device, seconds,
                              cpu_bf16)}


def backbone_preset(backbone: str, preset_name: str):
    """The preset of ``backbone`` at ``preset_name``; ``base`` and ``released`` (the upstream
    backbones' one size, base's widths) stand for each other, so one run can compare them."""
    from bidsapp.model.presets import BACKBONE_PRESETS

    presets = BACKBONE_PRESETS[backbone.removesuffix("-plain")]
    twin = {"base": "released", "released": "base"}.get(preset_name)
    return presets[preset_name] if preset_name in presets or twin not in presets else presets[twin]


#: The forward passes of ``--forward``: (row name, encoder or autoencoder).
FORWARD_MODELS = {"swin4d": "encoder", "swin4d-mae": "autoencoder", "swift": "encoder",
                  "neurostorm": "encoder", "neurostorm-mae": "autoencoder"}


def measure_forward(name: str, frames: int, steps: int, threads: int | None = None) -> dict:
    """Median seconds of ``steps`` forward passes (after one untimed) of one window, no gradients.

    On CUDA (bf16 autocast, as the pretrain level) when there is a GPU, else on the CPU.
    """
    import time

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from dataclasses import replace

    from bidsapp.atlas import load_atlas
    from bidsapp.data import build_region_grid
    from bidsapp.grid import cube_atlas
    from bidsapp.model.factory import build_model, count_parameters
    from bidsapp.model.masking import build_masking
    from bidsapp.model.presets import PRESETS
    from bidsapp.model.upstream import NEUROSTORM_RELEASED, SWIFT_RELEASED, build_upstream

    torch.manual_seed(0)
    atlas = load_atlas()
    brain = torch.from_numpy(cube_atlas(atlas).brain)[None].to(device)  # (1, 96, 96, 96)
    x = torch.randn(1, frames, 96, 96, 96, device=device) * brain[:, None]
    if name.startswith("swin4d"):
        preset = PRESETS["base"]
        model = build_model(preset).to(device).eval()
        n_parameters = count_parameters(preset)
        if name == "swin4d":
            run = lambda: model.encode(x, brain)  # noqa: E731
        else:
            masking = build_masking("roi", build_region_grid(atlas, preset).to(device), 0.5)
            run = lambda: model(x, brain, masking(1, frames)).pred  # noqa: E731
    else:
        config = SWIFT_RELEASED if name == "swift" else replace(NEUROSTORM_RELEASED, mae=name.endswith("mae"))
        model = build_upstream(config).to(device).eval()
        n_parameters = sum(p.numel() for p in model.parameters())
        upstream_x = x.permute(0, 2, 3, 4, 1)[:, None]  # (1, 1, 96, 96, 96, T), as upstream reads it
        if name == "neurostorm-mae":  # half of the windows hidden, then the decoder
            grid = (*config.grid_shape(), frames)
            windows = [-(-g // w) for g, w in zip(grid, config.window_size, strict=True)]
            hidden = torch.rand(1, *windows, device=device) < 0.5
            for axis, w in enumerate(config.window_size, start=1):
                hidden = hidden.repeat_interleave(w, axis)
            hidden = hidden[:, :grid[0], :grid[1], :grid[2], :grid[3]]
            run = lambda: model.decode(model.encode(upstream_x, hidden)[-1])  # noqa: E731
        else:
            run = lambda: model.encode(upstream_x)[-1]  # noqa: E731
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                         enabled=device.type == "cuda"):
        for i in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
        peak = peak_rss_mb()  # before the counting pass
        ops = counted_ops(run, device)
    seconds = statistics.median(times)
    return {"benchmark": "backbone-forward", "backbone": name, "part": FORWARD_MODELS[name],
            "peak_rss_mb": peak,
            "preset": "base" if name.startswith("swin4d") else "released", "device": device.type,
            "batch": 1, "frames": frames, "seconds_per_forward": seconds,
            "seconds_per_forward_runs": times, "n_parameters": n_parameters, "steps": steps,
            "threads": torch.get_num_threads(), **efficiency(ops, seconds, device)}


def forward_rows(frames: int, steps: int, threads: int | None) -> None:
    """``--forward``: every model of :data:`FORWARD_MODELS` in its own process, then the rows."""
    rows = {name: in_child(measure_forward, name, frames, steps, threads) for name in FORWARD_MODELS}
    reference = {"encoder": rows["swin4d"], "autoencoder": rows["swin4d-mae"]}
    for row in rows.values():
        row["ratio_to_swin4d"] = row["seconds_per_forward"] / reference[row["part"]]["seconds_per_forward"]
        del row["seconds"]
        emit(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--backbones", nargs="+", default=["swin4d", "swin4d-plain", "vit4d"],
                        choices=["swin4d", "swin4d-plain", "vit4d", "neurostorm"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every backbone this many times, interleaved; report medians")
    parser.add_argument("--compile", action="store_true",
                        help="compile the forward pass, as pretrain --torch-compile does")
    parser.add_argument("--forward", action="store_true",
                        help="time forward passes of swin4d base, SwiFT and NeuroSTORM instead")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="steps on the CPU in bf16 autocast, as pretrain --cpu-bf16 does")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch threads (default: PyTorch's; 1 on a shared machine)")
    args = parser.parse_args()
    if args.forward:
        forward_rows(args.frames, args.steps, args.threads)
        return
    if args.cpu_bf16:
        from bidsapp.runtime import check_cpu_bf16

        check_cpu_bf16(torch.device("cpu"))
    measured = (args.batch_size, args.frames, args.steps, args.warmup, args.compile,
                args.cpu_bf16, args.threads)
    if env_world_size() > 1:  # under torchrun: every rank is already its own fresh process
        if len(args.presets) * len(args.backbones) > 1:
            parser.error("under torchrun, measure one preset and one backbone per launch")
        row = measure(args.backbones[0], args.presets[0], *measured)
        if env_rank() == 0:
            emit(row)
        return
    backbones = ["swin4d", *(b for b in args.backbones if b != "swin4d")]
    for preset in args.presets:
        rows: dict[str, list[dict]] = {b: [] for b in backbones}
        for _ in range(args.repeats):
            for backbone in backbones:
                rows[backbone].append(in_child(measure, backbone, preset, *measured))
        reference = statistics.median(r["seconds_per_step"] for r in rows["swin4d"])
        for backbone in args.backbones:
            seconds = [r["seconds_per_step"] for r in rows[backbone]]
            row = dict(rows[backbone][0], seconds_per_step=statistics.median(seconds),
                       seconds_per_step_repeats=seconds, repeats=args.repeats)
            row.update(samples_per_second=args.batch_size / row["seconds_per_step"],
                       ratio_to_swin4d=row["seconds_per_step"] / reference,
                       peak_rss_mb=max(r["peak_rss_mb"] for r in rows[backbone]))
            del row["seconds"]
            emit(row)


if __name__ == "__main__":
    main()
