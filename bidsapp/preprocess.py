"""Each BOLD run to a model-ready, memory-mapped cache entry, once.

A run (BOLD series and its brain mask, in MNI space) is brought to the MNI 2 mm grid if it is on
another grid (its values copied where voxel centres coincide, as on fMRIPrep's res-2 grid, else
interpolated trilinearly; the mask by nearest neighbour), optionally resampled in time, cut to
the 96^3 cube (:mod:`bidsapp.grid`), z-scored with one mean and standard deviation over all brain
voxels and frames (as NeuroSTORM), and stored at the model's working resolution, on the cells
that hold brain only.

With ``downsample`` s (:class:`~bidsapp.cache.PreprocessParams`; the preset's, so that the model
pools nothing) the working grid has (96 / s)^3 cells of s^3 cube voxels. The z-scored cube,
background 0, is average-pooled over the cells in float32, chunk by chunk of frames, exactly as
:meth:`bidsapp.model.mae.MaskedAutoencoder.prepare` would pool it (``F.avg_pool3d``), then stored
in the layout of :mod:`bidsapp.cache` (the support: the cells with at least one brain voxel).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.affines import apply_affine
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import SpatialImage
from nilearn.image import resample_img
from nilearn.image.resampling import BoundingBoxError
from scipy.interpolate import interp1d

from bidsapp._version import __version__
from bidsapp.cache import CACHE_FORMAT, CachedRun, PreprocessParams, cache_key, open_or_build, write_entry
from bidsapp.errors import BadDataError, IOFailureError, NoInputError
from bidsapp.grid import (
    CUBE_SHAPE,
    MNI_2MM_AFFINE,
    MNI_2MM_SHAPE,
    from_cube,
    is_mni_2mm,
    mni_brain_mask,
    to_cube,
)
from bidsapp.io import file_sha256, write_error
from bidsapp.logs import get_logger

log = get_logger("preprocess")

#: Frames processed at a time: bounds peak memory independently of the run length.
CHUNK_FRAMES = 16
#: A resampled run must keep this share of its mask and have this share inside the MNI brain.
MIN_MNI_OVERLAP = 0.5
#: What a truncated, corrupt or empty NIfTI raises while it is read.
_READ_ERRORS = (ImageFileError, OSError, EOFError, zlib.error, ValueError)


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
    key = cache_key(bold_sha, mask_sha, params, repetition_time)
    provenance = {"key": key, "format": CACHE_FORMAT,
                  "source": str(bold.absolute()), "source_sha256": bold_sha,
                  "mask": str(mask.absolute()), "mask_sha256": mask_sha}
    return open_or_build(cache_root, key, lambda directory: _build_entry(
        directory, bold, mask, params, repetition_time, provenance), bold.name)


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise NoInputError(f"{path} does not exist")
    try:
        return file_sha256(path)
    except OSError as exc:
        raise IOFailureError(f"cannot read {path}: {exc.strerror or exc}") from exc


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
    in_template = (brain & mni_brain_mask(MNI_2MM_SHAPE, MNI_2MM_AFFINE)).sum() / max(brain.sum(), 1)
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
