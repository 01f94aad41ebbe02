"""The demo's subregional effect: opposite courses in two halves of a region, its mean unchanged.

:data:`~bidsapp.demo.signal.SIGNAL_MODEL` states the effect; this module cuts the
:data:`~bidsapp.demo.signal.SPLIT_REGIONS` in halves (:func:`split_halves`), draws the labels
(:func:`draw_subregional`) and plants the courses (:func:`plant_split`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bidsapp.atlas import Atlas
from bidsapp.demo.signal import (
    COUPLINGS,
    DIAGNOSES,
    SITES,
    SPLIT_CELL_EDGE,
    SPLIT_REGIONS,
    SPLIT_SHARE,
    SPLIT_TOKEN_EDGE,
    SPLITS,
    region_indices,
    region_records,
)
from bidsapp.errors import UsageError
from bidsapp.grid import CUBE_OFFSET, CUBE_SHAPE, MNI_2MM_AFFINE, MNI_2MM_SHAPE, cube_affine, to_cube


@dataclass(frozen=True)
class Split:
    """One region of :data:`SPLIT_REGIONS` cut in two halves by a token plane (its core only).

    Attributes
    ----------
    name : str
    axis : int
        0, 1 or 2: the axis (x, y, z of the voxel grids) the plane is normal to.
    plane : int
        The plane lies before this cube voxel index along ``axis``: half A holds the core voxels of
        cube index ``< plane``, half B the others.
    plane_mm : float
        The plane's MNI coordinate along ``axis`` (mm).
    half_a, half_b : ndarray of int
        Fortran-order flat indices, on the MNI 2 mm grid, of the core voxels of each half.
    tokens : tuple of int
        The ``tiny`` tokens each half's core voxels lie in.
    """

    name: str
    axis: int
    plane: int
    plane_mm: float
    half_a: np.ndarray
    half_b: np.ndarray
    tokens: tuple[int, int]


@dataclass(frozen=True)
class SplitRows:
    """The rows (among the V brain voxels) of one split region's halves and their weights h."""

    half_a: np.ndarray  # (K_A,) int rows of half A
    half_b: np.ndarray  # (K_B,) int rows of half B
    h_a: float          # +min(1, W_B / W_A)
    h_b: float          # -min(1, W_A / W_B)


def split_halves(atlas: Atlas, labels: np.ndarray | None = None) -> list[Split]:
    """The two halves of the core of every region of :data:`SPLIT_REGIONS`.

    The core of a region is its voxels whose 4 mm cell (``SPLIT_CELL_EDGE^3`` voxels of the 96^3
    cube) lies wholly in the region. Of the planes between tokens of the ``tiny`` grid (every
    ``SPLIT_TOKEN_EDGE`` cube voxels) along x, y and z that cut the core, the one leaving the
    most equal halves is taken (ties: the first axis, then the lowest plane).

    Parameters
    ----------
    atlas : Atlas
        An AAL3 atlas naming every region of :data:`SPLIT_REGIONS`.
    labels : ndarray, shape (91, 109, 91), optional
        The atlas's label values on the MNI 2 mm grid (default: resampled from ``atlas``).

    Returns
    -------
    list of Split
        In the order of :data:`SPLIT_REGIONS`.

    Raises
    ------
    UsageError
        A region is missing from the atlas, or has no core a token plane cuts.
    """
    if labels is None:
        labels = atlas.resample_to(MNI_2MM_SHAPE, MNI_2MM_AFFINE)
    cube = to_cube(np.asarray(labels).astype(np.int64), fill=0)  # (96, 96, 96) label values
    e, n = SPLIT_CELL_EDGE, CUBE_SHAPE[0] // SPLIT_CELL_EDGE
    cells = cube.reshape(n, e, n, e, n, e)
    first = cells[:, :1, :, :1, :, :1]
    pure = (cells == first).all(axis=(1, 3, 5))                                 # (n, n, n)
    core = np.where(pure, first[:, 0, :, 0, :, 0], 0)
    core = core.repeat(e, axis=0).repeat(e, axis=1).repeat(e, axis=2)          # (96, 96, 96)
    affine = cube_affine()
    splits = []
    for name, index in zip(SPLIT_REGIONS, region_indices(atlas, SPLIT_REGIONS), strict=True):
        where = np.argwhere(core == index)                                      # (K, 3) cube
        planes = [(axis, plane) for axis in range(3)
                  for plane in range(SPLIT_TOKEN_EDGE, CUBE_SHAPE[axis], SPLIT_TOKEN_EDGE)
                  if len(where) and where[:, axis].min() < plane <= where[:, axis].max()]
        if not planes:
            raise UsageError(f"region {name} of atlas {atlas.name} has no core that a token "
                             "plane cuts: the demo needs an AAL3 atlas")
        axis, plane = min(planes, key=lambda ap: abs(2 * int((where[:, ap[0]] < ap[1]).sum())
                                                     - len(where)))
        below = where[:, axis] < plane
        flat = [np.sort(np.ravel_multi_index((where[side] - np.asarray(CUBE_OFFSET)).T,
                                             MNI_2MM_SHAPE, order="F")) for side in (below, ~below)]
        tokens = tuple(len(np.unique(where[side] // SPLIT_TOKEN_EDGE, axis=0))
                       for side in (below, ~below))
        plane_mm = float(affine[axis, axis] * (plane - 0.5) + affine[axis, 3])
        splits.append(Split(name, axis, plane, plane_mm, flat[0], flat[1], tokens))
    return splits


def split_rows(splits: list[Split], voxels: np.ndarray, baseline: np.ndarray) -> tuple[SplitRows, ...]:
    """Each split's rows among the brain voxels and its weights ``h`` (:data:`SIGNAL_MODEL`).

    Parameters
    ----------
    splits : list of Split
    voxels : ndarray of int, shape (V,)
        Fortran-order flat indices of the brain voxels, sorted.
    baseline : ndarray, shape (V,)
        Their baseline ``b``.
    """
    rows = []
    for split in splits:
        rows_a, rows_b = np.searchsorted(voxels, split.half_a), np.searchsorted(voxels, split.half_b)
        w_a, w_b = (float(baseline[r].sum(dtype=np.float64)) for r in (rows_a, rows_b))
        # The smaller half takes the full share, the larger a share scaled so the sums cancel.
        rows.append(SplitRows(rows_a, rows_b, min(1.0, w_b / w_a), -min(1.0, w_a / w_b)))
    return tuple(rows)


def draw_subregional(rng: np.random.Generator, participants: pd.DataFrame) -> list[str]:
    """Balanced ``subregional`` labels, balanced within diagnosis x site x coupling cells.

    As :func:`~bidsapp.demo.signal.draw_coupling`, one level up: the participants are walked
    cell by cell (members shuffled), alternating the two labels from a random first one, the
    cells visited in a Gray-code order of (diagnosis, site, coupling), so that consecutive cells
    differ in one factor. With equal cells of odd size (3 each for 24 participants), every level
    of every factor, and every pair of factors, gets both labels equally.
    """
    sites = list(SITES)
    gray = [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1), (1, 0, 0)]
    columns = {column: participants[column].to_numpy()
               for column in ("diagnosis", "site", "coupling")}
    order = np.concatenate([
        rng.permutation(np.flatnonzero((columns["diagnosis"] == DIAGNOSES[d])
                                       & (columns["site"] == sites[s])
                                       & (columns["coupling"] == COUPLINGS[c])))
        for d, s, c in gray
    ])
    first = int(rng.integers(2))
    labels = [""] * len(participants)
    for position, i in enumerate(order):
        labels[i] = SPLITS[(first + position) % 2]
    return labels


def plant_split(noise: np.ndarray, rows: SplitRows, scale: np.ndarray, course: np.ndarray) -> None:
    """Give both halves of one split region their opposite courses, in place.

    Parameters
    ----------
    noise : ndarray, shape (V, T)
        The scaled own noise of every brain voxel (``amplitude * sqrt(1 - w) * n``).
    rows : SplitRows
    scale : ndarray, shape (V,)
        Every voxel's ``amplitude * sqrt(1 - w)`` (proportional to the baseline inside a region).
    course : ndarray, shape (T,)
        The region's standardized course ``s``.
    """
    for half, h in ((rows.half_a, rows.h_a), (rows.half_b, rows.h_b)):
        values, weights = noise[half], scale[half]                           # (K, T), (K,)
        # The half's baseline-weighted mean noise, kept: the deviations from it sum to 0.
        mean = values.sum(axis=0, dtype=np.float64) / weights.sum(dtype=np.float64)  # (T,)
        common = weights[:, None] * mean.astype(np.float32)
        keep = np.float32(np.sqrt(1 - SPLIT_SHARE * h**2))
        noise[half] = (common + keep * (values - common)
                       + np.float32(np.sqrt(SPLIT_SHARE) * h) * weights[:, None] * course)


def split_records(atlas: Atlas, splits: list[Split],
                  rows: tuple[SplitRows, ...]) -> list[dict[str, Any]]:
    """The truth record's entry of every split region: its plane, halves and weights."""
    records = []
    for split, weights, record in zip(splits, rows, region_records(atlas, SPLIT_REGIONS),
                                      strict=True):
        axis = "xyz"[split.axis]
        # Half A holds the lower cube indices: larger mm where the axis is flipped (x).
        side = ">" if cube_affine()[split.axis, split.axis] < 0 else "<"
        records.append({**record, "axis": axis, "plane_mm": split.plane_mm,
                        "half_a": f"{axis} {side} {split.plane_mm:g} mm",
                        "core_voxels": [len(split.half_a), len(split.half_b)],
                        "tokens": list(split.tokens), "h": [weights.h_a, weights.h_b]})
    return records
