"""Each BOLD run to a model-ready, memory-mapped cache entry, once.

A run (BOLD series and its brain mask, in MNI space) is brought to the MNI 2 mm grid if it is on
another grid (its values copied where voxel centres coincide, as on fMRIPrep's res-2 grid, else
interpolated trilinearly; the mask by nearest neighbour), optionally resampled in time, cut to
the 96^3 cube (:mod:`bidsapp.grid`), z-scored with one mean and standard deviation over all brain
voxels and frames (as NeuroSTORM), and stored at the model's working resolution, on the cells
that hold brain only.

With ``downsample`` s (:class:`PreprocessParams`; the preset's, so that the model pools nothing)
the working grid has (96 / s)^3 cells of s^3 cube voxels. The z-scored cube, background 0, is
average-pooled over the cells in float32, chunk by chunk of frames, exactly as
:meth:`bidsapp.model.mae.MaskedAutoencoder.prepare` would pool it (``F.avg_pool3d``), then stored.
The *support* is the cells with at least one brain voxel; the stored columns are the support
cells, in C order of the working grid::

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

The key hashes the content of both files and the parameters, so an entry is reused whatever the
path or time stamp of its inputs, and any change to them makes a new entry. An entry is built in a
temporary directory and renamed into place when complete, under a file lock, so a crash leaves no
half entry and two processes never build the same one. It is written with plain writes (not through a
memory map, where a full disk raises SIGBUS), so a full disk or quota is one error (exit 74) and the
temporary directory is removed.

Trust: an entry is found by its key and read without re-checking its data against the sources, so
anyone who can write to the cache directory can plant data that later runs use. A shared work
directory must be writable only by users who trust each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.affines import apply_affine
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import SpatialImage
from nilearn.datasets import load_mni152_brain_mask
from nilearn.image import resample_img
from nilearn.image.resampling import BoundingBoxError
from scipy.interpolate import interp1d

from bidsapp import __version__
from bidsapp.errors import BadDataError, IOFailureError, NoInputError
from bidsapp.grid import CUBE_SHAPE, MNI_2MM_AFFINE, MNI_2MM_SHAPE, from_cube, is_mni_2mm, to_cube
from bidsapp.io import atomic_write_json, ensure_dir, file_lock, file_sha256, write_error
from bidsapp.logs import get_logger

log = get_logger("preprocess")

#: Bumped whenever the content of an entry changes meaning; part of the key.
CACHE_FORMAT = 2
#: Frames processed at a time: bounds peak memory independently of the run length.
CHUNK_FRAMES = 16
#: A resampled run must keep this share of its mask and have this share inside the MNI brain.
MIN_MNI_OVERLAP = 0.5
#: What a truncated, corrupt or empty NIfTI raises while it is read.
_READ_ERRORS = (ImageFileError, OSError, EOFError, zlib.error, ValueError)


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


def prepare_run(bold: Path, mask: Path, cache_root: Path, params: PreprocessParams,
                repetition_time: float | None = None) -> CachedRun:
    """Preprocess one run into the cache, or reuse its entry.

    Parameters
    ----------
    bold : Path
        4D BOLD series in MNI space (any grid; resampled to the MNI 2 mm grid if needed).
    mask : Path
        Brain mask on the BOLD's grid.
    cache_root : Path
        Directory holding the cache entries.
    params : PreprocessParams
    repetition_time : float, optional
        TR in seconds (from the sidecar); else the NIfTI header's is used.

    Returns
    -------
    CachedRun

    Raises
    ------
    BadDataError
        Unreadable file, not a 4D series, NaN/Inf in the brain, not in MNI space, mask on another
        grid or empty, too few frames for one window, unknown TR when resampling in time.
    """
    bold, mask = Path(bold), Path(mask)
    bold_sha, mask_sha = _sha256(bold), _sha256(mask)
    key = _cache_key(bold_sha, mask_sha, params, repetition_time)
    provenance = {"key": key, "format": CACHE_FORMAT,
                  "source": str(bold.absolute()), "source_sha256": bold_sha,
                  "mask": str(mask.absolute()), "mask_sha256": mask_sha}
    cache_root = ensure_dir(Path(cache_root))
    entry = cache_root / key[:16]
    with file_lock(cache_root / f".{entry.name}.lock"):
        cached = _existing_entry(entry, key)
        if cached is not None:
            log.info("reusing cache %s for %s", entry, bold.name)
            return cached
        # Under the lock nobody else builds this entry: what is left is from an older format
        # or from a process that was killed mid-way.
        for stale in [entry, *cache_root.glob(f".{entry.name}.*.tmp")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_root / f".{entry.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            ensure_dir(tmp)
            _build_entry(tmp, bold, mask, params, repetition_time, provenance)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_cached(entry)


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise NoInputError(f"{path} does not exist")
    try:
        return file_sha256(path)
    except OSError as exc:
        raise IOFailureError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _cache_key(bold_sha: str, mask_sha: str, params: PreprocessParams,
               repetition_time: float | None) -> str:
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


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what a truncated, corrupt or empty file raises into one line for the user."""
    try:
        yield
    except _READ_ERRORS as exc:
        raise BadDataError(f"cannot read {path}: {str(exc) or type(exc).__name__} "
                           "(truncated or corrupt file?)") from exc


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK_FRAMES):
        yield slice(start, min(start + CHUNK_FRAMES, n))


def _build_entry(directory: Path, bold: Path, mask: Path, params: PreprocessParams,
                 repetition_time: float | None, provenance: dict[str, Any]) -> None:
    """Preprocess ``bold`` into the empty ``directory``; ``provenance`` opens the manifest."""
    # keep_file_open: chunks are read in order, so a .nii.gz is decompressed once, not per chunk.
    with _reading(bold):
        image = nib.load(bold, keep_file_open=True)
    if len(image.shape) != 4:
        raise BadDataError(f"{bold}: expected a 4D BOLD series, got shape {image.shape}")
    if image.get_data_dtype().kind == "c":
        raise BadDataError(f"{bold}: complex-valued BOLD ({image.get_data_dtype()}); roimae needs "
                           "real values (magnitude images, as fMRIPrep writes them)")
    _check_size(image, bold)
    inside = _mask_on_grid(mask, image, bold)  # (X, Y, Z) bool, on the BOLD's grid

    source_tr = _source_tr(image, repetition_time, bold)
    n_frames = _n_output_frames(image.shape[3], source_tr, params.target_tr, bold)
    if n_frames < params.window_frames:
        raise BadDataError(f"{bold}: {n_frames} frames, fewer than one window of "
                           f"{params.window_frames}")
    log.info("preparing %s (%d frames)", bold.name, image.shape[3])

    resample = not is_mni_2mm(image.shape, image.affine)
    brain_mni = _brain_on_mni_grid(inside, image.affine, bold, mask) if resample else inside
    brain = to_cube(brain_mni, fill=False)  # (96, 96, 96)
    if not brain.any():
        raise BadDataError(f"{mask}: no brain voxel inside the model's field of view")
    # The brain voxels of the MNI grid that the cube keeps, in the cube's C order (the shift
    # between the grids is monotone along every axis, so both orders agree).
    kept = from_cube(brain, fill=False)
    brain_index = np.flatnonzero(brain)

    sampler = VoxelSampler.between(kept, image.affine, image.shape)
    values = _brain_values(image, inside, sampler, bold)  # (T, n_brain) float32
    if params.target_tr is not None:
        values = _resample_time(values, source_tr, params.target_tr)
    mean, std = _global_stats(values)
    if not std > 0:
        raise BadDataError(f"{bold}: the signal is constant inside the brain mask")
    n_windows = n_frames // params.window_frames
    if n_frames % params.window_frames:
        log.debug("%s: last %d frames fill no window and are not used for windows", bold.name,
                  n_frames % params.window_frames)

    voxels, model_brain = cell_counts(brain, params.downsample)
    support = np.flatnonzero(voxels)

    def rows() -> Iterator[np.ndarray]:
        for chunk in _chunks(n_frames):
            normalised = values[chunk] - np.float32(mean)
            normalised *= np.float32(1 / std)
            yield pool_brain_values(normalised, brain_index, params.downsample, support)

    manifest = {
        **provenance,
        "params": params.key(),
        "n_frames": n_frames,
        "repetition_time": params.target_tr or source_tr,
        "source_repetition_time": source_tr,
        "n_windows": n_windows,
        "n_brain": int(brain.sum()),
        "n_support": len(support),
        "spatially_resampled": resample,
        "normalization": {"mean": mean, "std": std},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "roimae_version": __version__,
    }
    try:
        write_entry(directory, rows(), (n_frames, len(support)), params.dtype, model_brain,
                    voxels, manifest)
    except OSError as exc:
        raise write_error(directory, exc, f"the cache of {bold.name} in {directory.parent}") \
            from exc


def cell_counts(brain: np.ndarray, downsample: int) -> tuple[np.ndarray, np.ndarray]:
    """The brain voxels of each working cell, and the model's brain mask on the working grid.

    Parameters
    ----------
    brain : ndarray, shape (96, 96, 96), bool
    downsample : int

    Returns
    -------
    voxels : ndarray, shape (96/s, 96/s, 96/s), unsigned (uint8 up to s = 6)
        Brain voxels in each cell of ``downsample``^3 voxels (the support: ``voxels > 0``).
    brain : ndarray, shape (96/s, 96/s, 96/s), bool
        Cells at least half brain, computed as :meth:`MaskedAutoencoder.prepare` does.
    """
    s = downsample
    shape = tuple(n // s for n in brain.shape)
    voxels = brain.reshape(shape[0], s, shape[1], s, shape[2], s).sum(
        axis=(1, 3, 5), dtype=np.min_scalar_type(s**3))
    if s == 1:
        return voxels, brain.astype(bool)
    pooled = F.avg_pool3d(torch.from_numpy(brain.astype(np.float32))[None, None], s)[0, 0]
    return voxels, (pooled >= 0.5).numpy()


def pool_brain_values(values: np.ndarray, brain_index: np.ndarray, downsample: int,
                      support: np.ndarray) -> np.ndarray:
    """Brain voxel values of some frames -> the support cells' means, background 0.

    Parameters
    ----------
    values : ndarray, shape (t, n_brain), float32
        Values of the cube's brain voxels (C order).
    brain_index : ndarray, shape (n_brain,)
        Their flat indices in the 96^3 cube.
    downsample : int
    support : ndarray, shape (n_support,)
        Flat indices of the cells to return on the working grid.

    Returns
    -------
    ndarray, shape (t, n_support), float32
        ``F.avg_pool3d`` of the cubes (what the model's ``prepare`` computes), at the support.
    """
    if downsample == 1:
        return values
    cubes = torch.zeros(len(values), int(np.prod(CUBE_SHAPE)))
    cubes[:, torch.from_numpy(brain_index)] = torch.from_numpy(values)
    pooled = F.avg_pool3d(cubes.view(1, len(values), *CUBE_SHAPE), downsample)  # (1, t, D, H, W)
    return pooled.reshape(len(values), -1)[:, torch.from_numpy(support)].numpy()


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


def _mask_on_grid(mask: Path, image: SpatialImage, bold: Path) -> np.ndarray:
    """The mask as a boolean volume, refused unless it is non-empty and on the BOLD's grid."""
    with _reading(mask):
        mask_image = nib.load(mask)
        values = np.asanyarray(mask_image.dataobj)
    if mask_image.shape != image.shape[:3] or not np.allclose(mask_image.affine, image.affine,
                                                               atol=1e-3):
        raise BadDataError(f"mask {mask} (shape {mask_image.shape}) is not on the grid of "
                           f"{bold} (shape {image.shape[:3]})")
    inside = values > 0
    if not inside.any():
        raise BadDataError(f"mask {mask} is empty")
    return inside


def _header_tr(image: SpatialImage) -> float | None:
    """TR in seconds from pixdim[4] and the time unit, ``None`` if the header has none."""
    zooms = image.header.get_zooms()
    if len(zooms) < 4 or not (np.isfinite(zooms[3]) and zooms[3] > 0):
        return None
    unit = image.header.get_xyzt_units()[1]
    return float(zooms[3]) * {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)


def _source_tr(image: SpatialImage, repetition_time: float | None, bold: Path) -> float:
    """The run's TR: the sidecar's ``RepetitionTime`` (BIDS), else the header's.

    Raises :class:`BadDataError` when neither gives one (onsets and --target-tr need it); warns
    when both are given and disagree, as a sidecar in milliseconds (2000 for 2 s) would.
    """
    header_tr = _header_tr(image)
    if repetition_time is None:
        if header_tr is None:
            raise BadDataError(f"{bold}: the repetition time is unknown (no RepetitionTime in "
                               "its JSON sidecar and no TR in the NIfTI header)")
        return header_tr
    if header_tr is not None and not np.isclose(repetition_time, header_tr, rtol=0.01):
        log.warning("%s: RepetitionTime %g s in its sidecar, but %g s in the NIfTI header; using "
                    "the sidecar's (BIDS gives it in seconds)", bold.name, repetition_time,
                    header_tr)
    return float(repetition_time)


#: At most this many output frames per input frame when resampling in time (``--target-tr``).
MAX_UPSAMPLING = 16


def _n_output_frames(n_frames: int, tr: float, target_tr: float | None, bold: Path) -> int:
    if target_tr is None:
        return n_frames
    n_out = max(round(n_frames * tr / target_tr), 1)
    if n_out > MAX_UPSAMPLING * n_frames:
        raise BadDataError(f"{bold}: resampling from TR {tr:g} s to --target-tr {target_tr:g} s "
                           f"would make {n_out} frames of {n_frames} (more than "
                           f"{MAX_UPSAMPLING}x); check the TR and --target-tr")
    return n_out


def _check_size(image: SpatialImage, bold: Path) -> None:
    """Refuse an uncompressed file that holds fewer bytes than its header claims.

    Nothing is allocated for frames a header promises but the file does not hold; a compressed
    file, whose size says nothing of its content, is read frame by frame instead (see
    :func:`_brain_values`).
    """
    if "".join(bold.suffixes[-1:]) != ".nii":
        return
    expected = int(image.header.get_data_offset()) + int(
        np.prod(image.shape, dtype=np.int64)) * image.get_data_dtype().itemsize
    actual = bold.stat().st_size
    if actual < expected:
        raise BadDataError(f"{bold}: its header claims {image.shape[3]} frames of "
                           f"{'x'.join(map(str, image.shape[:3]))} ({expected} bytes) but the file "
                           f"holds {actual} bytes (truncated file?)")


@lru_cache(maxsize=1)
def _template_brain() -> np.ndarray:
    """MNI152 brain mask shipped with nilearn, on the MNI 2 mm grid: (91, 109, 91) bool."""
    template = resample_img(load_mni152_brain_mask(resolution=2), target_affine=MNI_2MM_AFFINE,
                            target_shape=MNI_2MM_SHAPE, interpolation="nearest",
                            force_resample=True, copy_header=True)
    return np.asanyarray(template.dataobj) > 0


def _flat_voxels(voxels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(n, 3) voxel indices -> their positions in a volume flattened as NIfTI stores it (F order)."""
    return np.ravel_multi_index(tuple(voxels.T), shape[:3], order="F")


@dataclass(frozen=True)
class VoxelSampler:
    """How each kept voxel of the MNI 2 mm grid is read from a source grid.

    A copy when the kept voxel centres are source voxel centres (the MNI grid itself, fMRIPrep's
    97 x 115 x 97 res-2 grid, flipped axes); trilinear interpolation otherwise (a 3 mm grid), with
    source voxels outside the grid counted as 0. Only the kept (brain) voxels are computed, from
    frames kept in their on-disk layout, so no volume is resampled or transposed as a whole.

    Attributes
    ----------
    indices : ndarray, shape (n_corners, n_brain), int64
        Flat source voxel (F order) of each corner: 1 corner for a copy, 8 for trilinear.
    weights : ndarray, shape (n_corners, n_brain), float32, or None
        Trilinear weights; ``None`` for a copy.
    """

    indices: np.ndarray
    weights: np.ndarray | None

    @classmethod
    def between(cls, kept: np.ndarray, source_affine: np.ndarray,
                source_shape: tuple[int, ...]) -> VoxelSampler:
        """The sampler of the ``kept`` (91, 109, 91) voxels, in C order, from a source grid."""
        shape = np.array(source_shape[:3])
        mni_to_source = np.linalg.inv(source_affine) @ MNI_2MM_AFFINE
        source = apply_affine(mni_to_source, np.argwhere(kept))  # (n_brain, 3) source voxels
        nearest = np.round(source).astype(np.int64)
        if np.allclose(source, nearest, atol=1e-3) and ((nearest >= 0) & (nearest < shape)).all():
            return cls(_flat_voxels(nearest, source_shape)[None], None)
        base = np.floor(source).astype(np.int64)
        fraction = (source - base).astype(np.float32)
        indices, weights = [], []
        for corner in itertools.product((0, 1), repeat=3):
            voxel = base + corner
            inside = ((voxel >= 0) & (voxel < shape)).all(axis=1)
            weight = np.prod(np.where(corner, fraction, 1 - fraction), axis=1)
            indices.append(_flat_voxels(np.clip(voxel, 0, shape - 1), source_shape))
            weights.append(np.where(inside, weight, 0))
        return cls(np.stack(indices), np.stack(weights).astype(np.float32))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Sample flattened frames.

        Parameters
        ----------
        frames : ndarray, shape (t, n_source)
            Source volumes, each flattened in F order; any real dtype. Non-finite values are read
            as 0 (the caller refuses them inside the brain mask).

        Returns
        -------
        ndarray, shape (t, n_brain), float32
        """
        if self.weights is None:
            return self._gather(frames, self.indices[0]).astype(np.float32, copy=False)
        sampled = np.zeros((frames.shape[0], self.indices.shape[1]), dtype=np.float32)
        for index, weight in zip(self.indices, self.weights, strict=True):
            sampled += self._gather(frames, index) * weight
        return sampled

    @staticmethod
    def _gather(frames: np.ndarray, index: np.ndarray) -> np.ndarray:
        """``frames[:, index]`` (t, n_brain), non-finite values read as 0."""
        values = np.take(frames, index, axis=1)
        if values.dtype.kind == "f":
            values = np.nan_to_num(values, copy=False, nan=0, posinf=0, neginf=0)
        return values


def _brain_on_mni_grid(inside: np.ndarray, affine: np.ndarray, bold: Path,
                       mask: Path) -> np.ndarray:
    """The mask on the MNI 2 mm grid (nearest neighbour), refused if the data are not in MNI."""
    try:
        resampled = resample_img(nib.Nifti1Image(inside.astype(np.uint8), affine),
                                 target_affine=MNI_2MM_AFFINE, target_shape=MNI_2MM_SHAPE,
                                 interpolation="nearest", force_resample=True, copy_header=True)
        brain = np.asanyarray(resampled.dataobj) > 0
    except BoundingBoxError as exc:
        raise BadDataError(f"{bold} is not in MNI space: its field of view does not overlap "
                           "the MNI grid") from exc
    source_mm3 = inside.sum() * abs(np.linalg.det(affine[:3, :3]))
    kept = brain.sum() * abs(np.linalg.det(MNI_2MM_AFFINE[:3, :3])) / source_mm3
    in_template = (brain & _template_brain()).sum() / max(brain.sum(), 1)
    if kept < MIN_MNI_OVERLAP or in_template < MIN_MNI_OVERLAP:
        raise BadDataError(
            f"{bold} is not in MNI space: on the MNI grid its mask {mask.name} keeps {kept:.0%} "
            f"of its volume and {in_template:.0%} of it lies in the MNI brain"
        )
    log.debug("%s resampled to the MNI 2 mm grid (%.0f%% of the mask kept)", bold.name, 100 * kept)
    return brain


def _brain_values(image: SpatialImage, inside: np.ndarray, sampler: VoxelSampler,
                  bold: Path) -> np.ndarray:
    """Read the run chunk by chunk; return the values of the kept brain voxels.

    Returns
    -------
    ndarray, shape (T, n_brain), float32
    """
    n_frames = image.shape[3]
    # Grown as frames are read (doubling: a realloc, which for large arrays remaps pages rather
    # than copying), so a header claiming more frames than a compressed file holds costs no more
    # memory than the frames it does hold: reading fails first.
    values = np.empty((min(n_frames, 4 * CHUNK_FRAMES), sampler.indices.shape[1]),
                      dtype=np.float32)
    mask_voxels = _flat_voxels(np.argwhere(inside), image.shape)  # (n_mask,)
    not_finite = np.zeros(len(mask_voxels), dtype=bool)
    for frames in _chunks(n_frames):
        with _reading(bold):
            chunk = np.asanyarray(image.dataobj[..., frames])  # (X, Y, Z, t), F order as stored
        flat = chunk.T.reshape(chunk.shape[3], -1)  # (t, X * Y * Z): a view, no copy
        if flat.dtype.kind == "f":
            not_finite |= ~np.isfinite(np.take(flat, mask_voxels, axis=1)).all(axis=0)
        if frames.stop > len(values):
            values.resize((min(n_frames, max(2 * len(values), frames.stop)), values.shape[1]),
                          refcheck=False)
        values[frames] = sampler(flat)
    if not_finite.any():
        raise BadDataError(f"{bold}: {int(not_finite.sum())} voxels inside the brain mask hold "
                           "NaN or infinite values")
    return values


def _resample_time(values: np.ndarray, tr: float, target_tr: float) -> np.ndarray:
    """Linear interpolation along time from ``tr`` to ``target_tr``.

    Frame ``i`` stands for the interval ``[i tr, (i + 1) tr)`` and is sampled at its centre, as
    NeuroSTORM (``align_corners=False``), so ``round(T tr / target_tr)`` frames cover the same
    duration; output centres beyond the first or last input centre take that frame's value.

    Returns
    -------
    ndarray, shape (round(T tr / target_tr), n_brain), float32
    """
    n_in = values.shape[0]
    n_out = max(round(n_in * tr / target_tr), 1)
    source_times = (np.arange(n_in) + 0.5) * tr
    times = np.clip((np.arange(n_out) + 0.5) * target_tr, source_times[0], source_times[-1])
    if n_in == 1:
        return np.repeat(values, n_out, axis=0)
    interpolate = interp1d(source_times, values, axis=0, copy=False, assume_sorted=True)
    resampled = np.empty((n_out, values.shape[1]), dtype=np.float32)
    for rows in _chunks(n_out):
        resampled[rows] = interpolate(times[rows])
    return resampled


def _global_stats(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation over every element, chunk by chunk.

    Two passes (squares about the mean, so a large mean costs no precision); each frame or chunk
    is reduced in float32 (NumPy's pairwise summation and BLAS dot products, ~1e-7 relative) and
    the partial sums are added in float64.
    """
    chunks = list(_chunks(len(values)))
    mean = sum(values[rows].sum(axis=1).sum(dtype=np.float64) for rows in chunks) / values.size
    square = 0.0
    for rows in chunks:
        centred = values[rows] - np.float32(mean)
        square += float(np.einsum("ij,ij->", centred, centred))
    return float(mean), float(np.sqrt(square / values.size))


class WindowDataset(torch.utils.data.Dataset):
    """Windows of cached runs as model inputs, kept compact until they are batched.

    Parameters
    ----------
    runs : sequence of CachedRun
        Stored at one resolution (one ``downsample``).
    window_indices : sequence of (run index, window index), optional
        The windows to serve; all windows of all runs by default.

    Items are dicts: ``values`` (T, n_support) tensor of the stored values (the support cells,
    float16 by default), ``support_index`` (n_support,) int64 flat indices of the support cells in
    the run's grid, ``brain`` (D, H, W) bool tensor of the run's brain mask on that grid, ``run``
    and ``window`` ints. :func:`collate_windows` turns a list of them into model inputs; a
    DataLoader needs ``collate_fn=collate_windows``.
    """

    def __init__(self, runs: Sequence[CachedRun],
                 window_indices: Sequence[tuple[int, int]] | None = None) -> None:
        self.runs = list(runs)
        if window_indices is None:
            window_indices = [(r, w) for r, run in enumerate(self.runs)
                              for w in range(run.n_windows)]
        self.window_indices = [(int(r), int(w)) for r, w in window_indices]

    def __len__(self) -> int:
        return len(self.window_indices)

    def __getitem__(self, i: int) -> dict:
        run_index, window_index = self.window_indices[i]
        run = self.runs[run_index]
        frames = run.window_slice(window_index)
        return {"values": torch.from_numpy(np.array(run.data[frames])),  # read from the memmap
                "support_index": torch.from_numpy(run.support_index),
                "brain": torch.from_numpy(run.brain),             # read from the entry
                "run": run_index, "window": window_index}


def collate_windows(items: Sequence[dict]) -> dict:
    """Batch :class:`WindowDataset` items into model inputs, writing each grid once.

    Returns
    -------
    dict
        ``x`` float32 tensor (B, T, D, H, W) on the runs' stored grid (the 96^3 cube at
        downsample 1), 0 outside the support; ``brain`` bool tensor (B, D, H, W); ``run`` and
        ``window`` int64 tensors (B,).
    """
    shape = tuple(items[0]["brain"].shape)
    if any(tuple(item["brain"].shape) != shape for item in items):
        raise ValueError("cannot batch windows of runs cached at different resolutions: "
                         f"{sorted({tuple(item['brain'].shape) for item in items})}")
    n_frames = items[0]["values"].shape[0]
    x = torch.zeros(len(items), n_frames, int(np.prod(shape)))
    for row, item in enumerate(items):
        x[row].index_copy_(1, item["support_index"], item["values"].float())
    return {"x": x.view(len(items), n_frames, *shape),
            "brain": torch.stack([item["brain"] for item in items]),
            "run": torch.tensor([item["run"] for item in items]),
            "window": torch.tensor([item["window"] for item in items])}
