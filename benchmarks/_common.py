"""Shared helpers of the benchmarks: machine description, timing in a child process, JSON output.

Each measurement runs in a fresh child process (``multiprocessing`` spawn), so that its peak resident
memory (``ru_maxrss``) is its own and no cache of an earlier measurement helps it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Callable
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _child(fn: Callable[..., dict], args: tuple, queue: multiprocessing.Queue) -> None:
    start = time.perf_counter()
    result = fn(*args)
    result.setdefault("seconds", time.perf_counter() - start)
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


def in_child(fn: Callable[..., dict], *args: Any) -> dict:
    """Run ``fn(*args)`` in a spawned process; return its result with seconds and peak RSS."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(fn, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def emit(record: dict[str, Any]) -> None:
    """Print one measurement as a JSON object on one line."""
    print(json.dumps({**record, "machine": machine()}, default=float), flush=True)
