"""Shared helpers of the benchmarks: machine description, timing in a child process, JSON output.

Each measurement runs in a fresh child process (``multiprocessing`` spawn), so that its peak resident
memory (``VmHWM``) is its own and no cache of an earlier measurement helps it.
"""

from __future__ import annotations

import functools
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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)


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
    result.setdefault("peak_rss_mb", peak_rss_mb())  # ``fn`` may measure it before counting
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
                 warmup: int = 1, cpu_bf16: bool = False) -> float:
    """Median seconds of ``steps`` pretraining steps (as the pretrain level runs them: mask draw,
    forward with bf16 autocast on CUDA, and on the CPU with ``cpu_bf16`` as ``--cpu-bf16``,
    backward, AdamW) after ``warmup`` untimed ones.

    ``batches`` yields dicts with ``x`` (B, T, 96, 96, 96) and ``brain`` (B, 96, 96, 96), or at
    the model's working shape, on any device; moving them to ``device`` is part of the step.
    """
    autocast = device.type == "cuda" or cpu_bf16
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


#: Dense bf16 peak of known cards (TFLOP/s), for the fraction-of-peak column on CUDA.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0}

#: Side of the float32 matrices whose product gives the CPU's reference rate.
MATMUL_SIZE = 2048


@functools.cache
def matmul_flops_per_second(size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """FLOP/s of one ``size x size`` float32 matrix product on the CPU, with this process's threads.

    The fastest of ``repeats`` products after one untimed one: the rate the CPU reaches on the
    operation it does best, measured in the run whose rows it divides (same threads, same load).
    Measured once per process.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _attention_shapes(*shapes: Any) -> tuple:
    # Axes before (heads, tokens, channels) folded into one batch axis, as the kernel reads them.
    return tuple((math.prod(s[:-3]), *s[-3:]) for s in shapes)


def _cpu_attention_flops(query: Any, key: Any, value: Any, *_args: Any, out_shape: Any = None,
                         **_kwargs: Any) -> int:
    return sdpa_flop_count(*_attention_shapes(query, key, value))


def _cpu_attention_backward_flops(grad_out: Any, query: Any, key: Any, value: Any, *_args: Any,
                                  out_shape: Any = None, **_kwargs: Any) -> int:
    return sdpa_backward_flop_count(*_attention_shapes(grad_out, query, key, value))


#: Flop formulas PyTorch's counter lacks: the CPU attention kernel that
#: ``scaled_dot_product_attention`` runs on the CPU, forward and backward (without them, a
#: swin4d step's attention would count 0 FLOPs).
CPU_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        _cpu_attention_backward_flops,
}


class _CountedOps(TorchDispatchMode):
    """Runs every call of an operation whose FLOPs PyTorch counts again, alone, right after it.

    Replaying each call as it happens holds no tensor beyond it (keeping the arguments for later
    would keep a whole pass's activations alive). Per operator: calls, FLOPs, seconds alone.
    """

    def __init__(self, device: torch.device, repeats: int) -> None:
        super().__init__()
        self.device, self.repeats = device, repeats
        self.ops: dict[str, dict[str, float]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket in flop_registry or func.overloadpacket in CPU_FLOP_FORMULAS:
            out = func(*args, **kwargs)
            self._replay(func, args, kwargs)
            return out
        if func is not torch.ops.prim.device.default:
            # Composite operations reach a mode undecomposed under inference mode (``matmul``,
            # ``linear``): decompose them into the counted ones, as the FLOP counter does.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)

    def _replay(self, func: Any, args: tuple, kwargs: dict) -> None:
        with FlopCounterMode(display=False, custom_mapping=CPU_FLOP_FORMULAS) as counter:
            func(*args, **kwargs)
        best = float("inf")
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            func(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        op = self.ops.setdefault(str(func.overloadpacket),
                                 {"calls": 0, "flops": 0, "seconds_alone": 0.0})
        op["calls"] += 1
        op["flops"] += counter.get_total_flops()
        op["seconds_alone"] += best


def counted_ops(fn: Callable[[], Any], device: torch.device,
                repeats: int = 3) -> dict[str, dict[str, float]]:
    """The FLOPs of ``fn()`` by operator, and the seconds its counted operations take alone.

    Every call of an operation whose FLOPs PyTorch counts (:class:`~torch.utils.flop_counter.
    FlopCounterMode`: matrix products, convolutions, and attention with the CPU kernels of
    :data:`CPU_FLOP_FORMULAS`) is run again on its arguments as it happens: once under the
    counter, then ``repeats`` times, the fastest kept. Elementwise work (norms, activations, the
    optimizer, Mamba's selective scan) is not counted, so fractions of peak derived from these
    FLOPs are lower bounds. ``fn`` runs once, slower than alone: never time it here.

    Returns, per operator (``aten.mm``, ...): ``calls``, ``flops`` and ``seconds_alone`` (summed
    over its calls). Their total is what ``fn()`` would cost if everything else (copies, norms,
    activations, indexing, the optimizer, Python) were free: the FLOPs over it bound the fraction
    of peak that the model's own shapes allow.
    """
    recorder = _CountedOps(device, repeats)
    with recorder:
        fn()
    return recorder.ops


def efficiency(ops: dict[str, dict[str, float]], seconds: float,
               device: torch.device) -> dict[str, Any]:
    """The columns of a row whose counted operations ``ops`` (:func:`counted_ops`) ran in ``seconds``.

    ``flops`` (their total), ``tflops`` (their rate) and ``fraction_of_peak`` of ``peak_tflops``:
    the card's dense bf16 peak on CUDA (``None`` for a card not in :data:`BF16_PEAK_TFLOPS`) and,
    on the CPU, the rate of a 2048^2 float32 matrix product measured in this process
    (:func:`matmul_flops_per_second`). Then the bound the operations' own shapes set:
    ``counted_ops_seconds`` (what they take alone), ``counted_ops_share`` (of ``seconds``),
    ``counted_ops_fraction_of_peak`` (the fraction the row would reach if nothing else took
    time), and ``by_op``: each operator's calls, FLOPs, seconds alone and fraction of the peak.
    """
    flops = sum(op["flops"] for op in ops.values())
    alone = sum(op["seconds_alone"] for op in ops.values())
    if device.type == "cuda":
        card = torch.cuda.get_device_name(0)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in card), None)
        reference = f"{card} dense bf16 peak"
    else:
        peak = matmul_flops_per_second() / 1e12
        reference = f"{MATMUL_SIZE}^2 float32 matmul, measured"

    def fraction(n_flops: float, in_seconds: float) -> float | None:
        return n_flops / in_seconds / 1e12 / peak if peak and in_seconds > 0 else None

    return {"flops": flops, "tflops": flops / seconds / 1e12, "peak_tflops": peak,
            "peak": reference, "fraction_of_peak": fraction(flops, seconds),
            "counted_ops_seconds": alone, "counted_ops_share": alone / seconds,
            "counted_ops_fraction_of_peak": fraction(flops, alone),
            "by_op": {name: {**op, "fraction_of_peak": fraction(op["flops"], op["seconds_alone"])}
                      for name, op in ops.items()}}


def step_efficiency(network: torch.nn.Module, masking: Callable, batch: dict,
                    device: torch.device, seconds_per_step: float,
                    cpu_bf16: bool = False) -> dict[str, Any]:
    """:func:`efficiency` of one training step (forward and backward, as :func:`step_seconds`,
    with the same autocast).

    Runs one more forward and backward, whose gradients are left to the next ``zero_grad``.
    """
    x, brain = batch["x"].to(device), batch["brain"].to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=device.type == "cuda" or cpu_bf16):
            loss = network(x, brain, masking(x.shape[0], x.shape[1])).loss
        loss.backward()

    return efficiency(counted_ops(step, device), seconds_per_step, device)
