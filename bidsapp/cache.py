"""The cache contract: where a preprocessed run is stored, in what layout, and how it is read.

An entry holds one run at one model's working resolution (:mod:`bidsapp.preprocess` builds it)::

    <cache_root>/<key[:16]>/
        data.npy        (n_frames, n_support) float16, read memory-mapped: each support cell's
                        mean over its s^3 voxels, background counted as 0
        voxels.npy      (96/s, 96/s, 96/s) uint8 (the smallest unsigned type holding s^3):
                        brain voxels of the cube in each cell (1 or 0 at s = 1); the support
                        is ``voxels > 0``
        brain.npy       (96/s, 96/s, 96/s) bool: the model's brain mask, cells at least half
                        brain (``voxels >= s^3 / 2``, as ``prepare``); at s = 1 the run's mask
        manifest.json   sources and their sha256, parameters, frame count, TR, ...

At s = 1 the support is the brain mask and ``data`` holds the brain voxels (a quarter of the cube).
A cell's mean over its brain voxels is ``value * s^3 / voxels`` (what the functional-connectivity
baseline reads, :func:`bidsapp.readouts.region_timeseries`).

The key (:func:`cache_key`) hashes the content of both source files and the parameters, so an
entry is reused whatever the path or time stamp of its inputs, and any change to them makes a new
entry. An entry is built in a temporary directory and renamed into place when complete, under a
file lock (:func:`open_or_build`), so a crash leaves no half entry and two processes never build
the same one. It is written with plain writes (:func:`write_entry`; not through a memory map,
where a full disk raises SIGBUS), so a full disk or quota is one error (exit 74) and the temporary
directory is removed.

Trust: an entry is found by its key and read without re-checking its data against the sources, so
anyone who can write to the cache directory can plant data that later runs use. A shared work
directory must be writable only by users who trust each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bidsapp.errors import IOFailureError
from bidsapp.grid import CUBE_SHAPE
from bidsapp.io import atomic_write_json, ensure_dir, file_lock
from bidsapp.logs import get_logger

log = get_logger("preprocess")

#: Bumped whenever the content of an entry changes meaning; part of the key.
CACHE_FORMAT = 2


@dataclass(frozen=True)
class PreprocessParams:
    """Settings that change the content of a cache entry.

    Parameters
    ----------
    window_frames : int
        Frames per training window; windows do not overlap.
    target_tr : float, optional
        Resample every run to this repetition time (seconds), linearly in time.
    dtype : str
        Storage type of the z-scored values: ``"float16"`` or ``"float32"``.
    downsample : int
        Store the cube average-pooled over cells of ``downsample``^3 voxels: the working
        resolution of the model preset that reads the entry (its ``downsample``).
    """

    window_frames: int = 20
    target_tr: float | None = None
    dtype: str = "float16"
    downsample: int = 1

    def __post_init__(self) -> None:
        if self.window_frames < 1:
            raise ValueError(f"window_frames must be >= 1, got {self.window_frames}")
        if self.target_tr is not None and self.target_tr <= 0:
            raise ValueError(f"target_tr must be > 0, got {self.target_tr}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.downsample < 1 or any(n % self.downsample for n in CUBE_SHAPE):
            raise ValueError(f"downsample must divide {CUBE_SHAPE[0]}, got {self.downsample}")

    @property
    def working_shape(self) -> tuple[int, int, int]:
        """The grid of the stored values: the cube divided by ``downsample``."""
        return tuple(n // self.downsample for n in CUBE_SHAPE)

    def key(self) -> dict:
        """The parameters as a JSON-serialisable dict (hashed into the cache key)."""
        return dataclasses.asdict(self)


@dataclass
class CachedRun:
    """One preprocessed run, its values memory-mapped, at the working resolution it was stored at.

    An open run holds no array but the memory map of its values: its brain mask and support are
    read from the entry when asked for (a few hundred microseconds per window, from the page cache),
    so that pretraining on N runs needs the same memory for any N (an eager copy cost 0.35 MB per
    run at ``tiny``: 340 MB at 1,000 runs), and one memory map per run (the kernel's default
    limit is 65,530 per process).

    Attributes
    ----------
    directory : Path
        The cache entry.
    manifest : dict
        Sources and their sha256, parameters, ``n_frames``, ``repetition_time``, ``n_windows``,
        normalisation, creation time and roimae version.
    data : ndarray, shape (n_frames, n_support)
        Z-scored values of the support cells (C order of the grid), memory-mapped read-only.
    """

    directory: Path
    manifest: dict
    data: np.ndarray

    @property
    def brain(self) -> np.ndarray:
        """The run's brain mask on the stored grid: (D, H, W) bool, read from the entry.

        The grid is ``96 / downsample`` per side; at downsample s > 1 the mask holds the cells at
        least half brain, as the model pools it.
        """
        return np.load(self.directory / "brain.npy")

    @property
    def support_index(self) -> np.ndarray:
        """Where the columns of ``data`` lie in the flattened grid: (n_support,) int64."""
        return np.flatnonzero(self.cell_voxels())

    def __reduce__(self) -> tuple:
        # Pickling (spawned DataLoader workers) re-opens the entry instead of copying the data.
        return load_cached, (self.directory,)

    @property
    def n_frames(self) -> int:
        """Frames stored (after temporal resampling), leftovers beyond the last window included."""
        return int(self.manifest["n_frames"])

    @property
    def n_windows(self) -> int:
        """Number of non-overlapping windows of ``window_frames`` frames."""
        return int(self.manifest["n_windows"])

    @property
    def window_frames(self) -> int:
        """Frames per window."""
        return int(self.manifest["params"]["window_frames"])

    @property
    def downsample(self) -> int:
        """Cube voxels per side of a stored cell (1: the 2 mm cube itself)."""
        return int(self.manifest["params"]["downsample"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """The stored grid ``(D, H, W)``."""
        return tuple(n // self.downsample for n in CUBE_SHAPE)

    @property
    def repetition_time(self) -> float | None:
        """Seconds between stored frames, ``None`` if the source did not say."""
        return self.manifest["repetition_time"]

    def cell_voxels(self) -> np.ndarray:
        """Brain voxels of the cube in each stored cell: (D, H, W) unsigned, read from the entry."""
        return np.load(self.directory / "voxels.npy")

    def frames(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` on the stored grid, 0 outside the support.

        Returns
        -------
        ndarray, shape (stop - start, D, H, W), float32
        """
        if not 0 <= start <= stop <= self.n_frames:
            raise IndexError(f"frames {start}:{stop} outside 0:{self.n_frames}")
        grids = np.zeros((stop - start, math.prod(self.shape)), dtype=np.float32)
        grids[:, self.support_index] = self.data[start:stop]
        return grids.reshape((stop - start, *self.shape))

    def window_slice(self, index: int) -> slice:
        """The frames of window ``index``; :class:`IndexError` if there is no such window."""
        if not 0 <= index < self.n_windows:
            raise IndexError(f"window {index} outside 0..{self.n_windows - 1}")
        return slice(index * self.window_frames, (index + 1) * self.window_frames)

    def window(self, index: int) -> np.ndarray:
        """Window ``index`` on the stored grid.

        Returns
        -------
        ndarray, shape (window_frames, D, H, W), float32
        """
        frames = self.window_slice(index)
        return self.frames(frames.start, frames.stop)


def load_cached(directory: Path) -> CachedRun:
    """Open a complete cache entry; :class:`IOFailureError` if it is incomplete or corrupt."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        brain = np.load(directory / "brain.npy")
        support = np.load(directory / "voxels.npy", mmap_mode="r") > 0
        data = np.load(directory / "data.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise IOFailureError(f"cache entry {directory} is unreadable: {exc}") from exc
    downsample = manifest.get("params", {}).get("downsample")
    if (not isinstance(downsample, int) or downsample < 1
            or brain.shape != tuple(n // downsample for n in CUBE_SHAPE)
            or support.shape != brain.shape
            or data.shape != (manifest.get("n_frames"), int(support.sum()))):
        raise IOFailureError(f"cache entry {directory} is inconsistent; delete it and re-run")
    return CachedRun(directory=directory, manifest=manifest, data=data)


def cache_key(bold_sha: str, mask_sha: str, params: PreprocessParams,
              repetition_time: float | None) -> str:
    """The key of a run's entry: a SHA-256 of its sources' contents and the parameters."""
    payload = {"format": CACHE_FORMAT, "bold": bold_sha, "mask": mask_sha,
               "params": params.key(), "repetition_time": repetition_time}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _existing_entry(entry: Path, key: str) -> CachedRun | None:
    if not entry.is_dir():
        return None
    try:
        cached = load_cached(entry)
    except IOFailureError:
        return None
    return cached if cached.manifest.get("key") == key else None


def open_or_build(cache_root: Path, key: str, build: Callable[[Path], None],
                  name: str) -> CachedRun:
    """The entry of ``key``: reused when complete, else built by ``build(directory)``.

    Parameters
    ----------
    cache_root : Path
        Directory holding the cache entries.
    key : str
        :func:`cache_key` of the run; the entry's manifest must record it.
    build : callable
        Writes a complete entry into an empty directory (:func:`write_entry`).
    name : str
        The run, for the log.

    Returns
    -------
    CachedRun
    """
    cache_root = ensure_dir(Path(cache_root))
    entry = cache_root / key[:16]
    with file_lock(cache_root / f".{entry.name}.lock"):
        cached = _existing_entry(entry, key)
        if cached is not None:
            log.info("reusing cache %s for %s", entry, name)
            return cached
        # Under the lock nobody else builds this entry: what is left is from an older format
        # or from a process that was killed mid-way.
        for stale in [entry, *cache_root.glob(f".{entry.name}.*.tmp")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_root / f".{entry.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            ensure_dir(tmp)
            build(tmp)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_cached(entry)


def write_entry(directory: Path, rows: Iterable[np.ndarray], shape: tuple[int, int], dtype: str,
                brain: np.ndarray, voxels: np.ndarray, manifest: dict) -> None:
    """Write the files of a cache entry (see the module docstring) into ``directory``.

    Parameters
    ----------
    directory : Path
        An existing, empty directory.
    rows : iterable of ndarray, each (t, n_support)
        The stored values, chunk by chunk of frames, ``shape[0]`` frames in all.
    shape : (n_frames, n_support)
    dtype : str
        Storage type of the values.
    brain, voxels : ndarray, shape (D, H, W)
        The brain mask and the brain voxels per cell on the stored grid.
    manifest : dict
        Written last, atomically: an entry without it is incomplete.
    """
    # Plain writes, not a memory map: on a full disk or quota a write through a map raises
    # SIGBUS and kills the process, while write() fails with ENOSPC / EDQUOT (exit 74).
    with open(directory / "data.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False, "shape": tuple(shape)})
        for chunk in rows:
            fh.write(np.ascontiguousarray(chunk, dtype=dtype).data)
        fh.flush()
        os.fsync(fh.fileno())
    np.save(directory / "brain.npy", brain)
    np.save(directory / "voxels.npy", voxels)
    atomic_write_json(directory / "manifest.json", manifest)
