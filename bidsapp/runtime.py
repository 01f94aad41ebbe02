"""Process-wide runtime settings: device choice, threads and seeds."""

from __future__ import annotations

import os
import random

import torch

from bidsapp.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """Map ``--device`` to a :class:`torch.device`.

    ``auto`` picks CUDA when PyTorch sees a GPU, else the CPU. ``cuda`` without a GPU is a usage
    error (exit 64) rather than a silent fall-back, so a cluster job never runs 100x slower unseen.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but PyTorch sees no CUDA GPU "
                         "(use --device cpu or auto, or check the driver / --nv for containers)")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX, through oneDNN)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def check_cpu_bf16(device: torch.device) -> None:
    """``--cpu-bf16`` on a CPU without bfloat16 instructions is a usage error (exit 64).

    PyTorch would emulate them, several times slower than float32: never what was asked for.
    """
    if device.type == "cpu" and not cpu_has_bf16():
        raise UsageError("--cpu-bf16: this CPU has no bfloat16 instructions (AVX512-BF16 or "
                         "AMX); train without --cpu-bf16")


def set_threads(n_threads: int) -> None:
    """Use ``n_threads`` threads for PyTorch and (via the environment) BLAS in workers."""
    torch.set_num_threads(n_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(n_threads))


def seed_everything(seed: int) -> None:
    """Seed Python and PyTorch; make CPU kernels deterministic.

    roimae's own NumPy code draws from explicit ``numpy.random.Generator`` objects, never the
    global NumPy state.
    """
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def step_generator(seed: int, *parts: int, device: torch.device) -> torch.Generator:
    """A generator whose state depends only on ``seed`` and ``parts`` (epoch, step, rank)."""
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(value)
    return generator
