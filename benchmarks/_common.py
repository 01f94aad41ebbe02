"""Shared helpers of the benchmarks: machine description, timing in a child process, JSON output.

Each measurement runs in a fresh child process (``multiprocessing`` spawn), so that its peak resident
memory (``VmHWM``) is its own and no cache of an earlier measurement helps it.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    ``VmHWM`` of the process's own address space on Linux: unlike ``ru_maxrss``, it does not carry
    over the parent's peak through fork + exec, so a spawned child reports only its own memory.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(fn: Callable[..., dict], args: tuple) -> dict:
    start = time.perf_counter()
    result = fn(*args)
    result.setdefault("seconds", time.perf_counter() - start)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def in_child(fn: Callable[..., dict], *args: Any) -> dict:
    """Run ``fn(*args)`` in a spawned process; return its result with seconds and peak RSS.

    An exception in the child is raised here, and a child that dies (killed, out of memory)
    raises :class:`~concurrent.futures.process.BrokenProcessPool`: neither leaves the benchmark
    waiting for a result that never comes.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child, fn, args).result()


def best_of(repeats: int, fn: Callable[..., dict], *args: Any) -> dict:
    """The fastest of ``repeats`` runs of :func:`in_child` (the least disturbed by other load)."""
    results = [in_child(fn, *args) for _ in range(repeats)]
    best = min(results, key=lambda result: result["seconds"])
    return {**best, "repeats": repeats}


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (JSON has no such numbers)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def emit(record: dict[str, Any]) -> None:
    """Print one measurement as a JSON object on one line (a value that is not finite as null)."""
    print(json.dumps(_json_safe({**record, "machine": machine()}), default=float), flush=True)


def step_seconds(model: torch.nn.Module, masking: Callable, optimizer: torch.optim.Optimizer,
                 batches: Iterable[dict], device: torch.device, steps: int,
                 warmup: int = 1) -> float:
    """Median seconds of ``steps`` pretraining steps (as the pretrain level runs them: mask draw,
    forward with bf16 autocast on CUDA, backward, AdamW) after ``warmup`` untimed ones.

    ``batches`` yields dicts with ``x`` (B, T, 96, 96, 96) and ``brain`` (B, 96, 96, 96), or at
    the model's working shape, on any device; moving them to ``device`` is part of the step.
    """
    autocast = device.type == "cuda"
    times = []
    for i, batch in enumerate(itertools.islice(batches, warmup + steps)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x = batch["x"].to(device, non_blocking=True)
        brain = batch["brain"].to(device, non_blocking=True)
        mask = masking(x.shape[0], x.shape[1])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, brain, mask).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


#: Dense bf16 peak of known cards (TFLOP/s), for the fraction-of-peak column.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0}


def bf16_peak_fraction(network: torch.nn.Module, masking: Callable, batch: dict,
                       device: torch.device, seconds_per_step: float) -> dict[str, float | None]:
    """TFLOP/s of one training step (FLOPs counted by PyTorch) and its fraction of the card's peak.

    Only on CUDA (an empty dict elsewhere); the fraction is ``None`` for a card not in
    :data:`BF16_PEAK_TFLOPS`.
    """
    if device.type != "cuda":
        return {}
    from torch.utils.flop_counter import FlopCounterMode

    x, brain = batch["x"].to(device), batch["brain"].to(device)
    with FlopCounterMode(display=False) as counter, \
            torch.autocast("cuda", dtype=torch.bfloat16):
        network(x, brain, masking(x.shape[0], x.shape[1])).loss.backward()
    tflops = counter.get_total_flops() / seconds_per_step / 1e12
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    return {"tflops": tflops, "fraction_of_bf16_peak": tflops / peak if peak else None}
