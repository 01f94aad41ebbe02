"""The model grid: the MNI 2 mm grid, the 96^3 cube the backbone sees, and atlas tokens.

Every run and the atlas are brought to the 91 x 109 x 91 MNI grid at 2 mm (``MNI_2MM_AFFINE``, the
FSL MNI152 2 mm grid that AAL3 ships on, x axis flipped), then cut to a 96^3 cube exactly as
NeuroSTORM does for such inputs (``select_middle_96`` followed by ``pad_to_96``):

* y (109 voxels) is centre-cropped to 96 voxels starting at ``(109 - 96) // 2 = 6``: MNI rows 6..101
  are kept, rows 0..5 and 102..108 dropped (no AAL3 voxel lies there);
* x and z (91 voxels) are padded to 96 with ``ceil(5 / 2) = 3`` voxels before and 2 after.

Hence cube voxel ``(i, j, k)`` is MNI-grid voxel ``(i - 3, j + 6, k - 3)``, and :func:`cube_affine`
maps both to the same millimetres, so the atlas and the data register voxel for voxel.

The atlas is then summarised per block (working voxel, token) by majority vote
(:func:`bidsapp.model.regions.block_majority`, through ``downsample_labels`` and
:meth:`~bidsapp.model.regions.RegionGrid.from_labels`), which is what region-guided masking hides
or keeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from nibabel.affines import from_matvec
from scipy import ndimage

if TYPE_CHECKING:
    from bidsapp.atlas import Atlas

MNI_2MM_SHAPE: tuple[int, int, int] = (91, 109, 91)
#: Voxel -> mm (RAS) of the MNI 2 mm grid; equals the affine of ``AAL3v1_2mm.nii.gz``.
MNI_2MM_AFFINE: np.ndarray = np.array(
    [[-2.0, 0.0, 0.0, 90.0], [0.0, 2.0, 0.0, -126.0], [0.0, 0.0, 2.0, -72.0], [0.0, 0.0, 0.0, 1.0]]
)
CUBE_SHAPE: tuple[int, int, int] = (96, 96, 96)


def mni_brain_mask(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """nilearn's MNI152 brain mask on a voxel grid (nearest neighbour): (X, Y, Z) bool.

    The one MNI brain mask of roimae: the check that a resampled run lies in MNI space, and the
    brain mask of an image given to the Python API without one. It is
    :func:`nilearn.datasets.load_mni152_brain_mask` (the template thresholded at 0.2), which holds
    96% of AAL3's voxels on the 2 mm grid; nilearn's ``compute_brain_mask(mask_type=
    "whole-brain")`` (threshold 0.5, then an opening) holds 91% and cuts cortex at the edges.
    Computed once per grid.
    """
    return _mni_brain_mask(tuple(int(n) for n in shape[:3]),
                           tuple(float(v) for v in np.asarray(affine).ravel()))


@lru_cache(maxsize=8)
def _mni_brain_mask(shape: tuple[int, ...], affine: tuple[float, ...]) -> np.ndarray:
    from nilearn.datasets import load_mni152_brain_mask
    from nilearn.image import resample_img

    template = resample_img(load_mni152_brain_mask(resolution=2),
                            target_affine=np.reshape(affine, (4, 4)), target_shape=shape,
                            interpolation="nearest", force_resample=True, copy_header=True)
    return np.asanyarray(template.dataobj) > 0


def _axis_slices(n_mni: int, n_cube: int) -> tuple[slice, slice]:
    """(MNI slice, cube slice) of one axis: centre crop (floor start) or pad (ceil before)."""
    if n_mni >= n_cube:
        start = (n_mni - n_cube) // 2
        return slice(start, start + n_cube), slice(0, n_cube)
    before = math.ceil((n_cube - n_mni) / 2)
    return slice(0, n_mni), slice(before, before + n_mni)


_MNI_SLICES, _CUBE_SLICES = (
    tuple(s) for s in zip(*map(_axis_slices, MNI_2MM_SHAPE, CUBE_SHAPE), strict=True)
)
#: Cube index minus MNI index along each axis: (3, -6, 3).
CUBE_OFFSET: tuple[int, int, int] = tuple(
    c.start - m.start for m, c in zip(_MNI_SLICES, _CUBE_SLICES, strict=True)
)


def to_cube(array: np.ndarray, fill: float = 0) -> np.ndarray:
    """Crop/pad an MNI 2 mm volume or series to the model cube.

    Parameters
    ----------
    array : ndarray, shape (91, 109, 91, ...)
        Volume (3D) or series (4D, time last) on the MNI 2 mm grid; any dtype.
    fill : scalar
        Value of the padded voxels.

    Returns
    -------
    ndarray, shape (96, 96, 96, ...)
        Same dtype; cube voxel ``(i, j, k)`` holds MNI voxel ``(i - 3, j + 6, k - 3)``.
    """
    _check_shape(array, MNI_2MM_SHAPE, "MNI 2 mm grid")
    cube = np.full(CUBE_SHAPE + array.shape[3:], fill, dtype=array.dtype)
    cube[_CUBE_SLICES] = array[_MNI_SLICES]
    return cube


def from_cube(cube: np.ndarray, fill: float = 0) -> np.ndarray:
    """Inverse of :func:`to_cube`: back to the MNI 2 mm grid.

    Parameters
    ----------
    cube : ndarray, shape (96, 96, 96, ...)
    fill : scalar
        Value of the 13 y rows that :func:`to_cube` cropped (MNI rows 0..5 and 102..108).

    Returns
    -------
    ndarray, shape (91, 109, 91, ...)
    """
    _check_shape(cube, CUBE_SHAPE, "model cube")
    array = np.full(MNI_2MM_SHAPE + cube.shape[3:], fill, dtype=cube.dtype)
    array[_MNI_SLICES] = cube[_CUBE_SLICES]
    return array


def _check_shape(array: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if array.shape[:3] != shape:
        raise ValueError(f"expected an array on the {what} {shape}, got shape {array.shape}")


def cube_affine() -> np.ndarray:
    """Voxel -> mm affine of the cube: a cube voxel maps where its source MNI voxel does.

    Returns
    -------
    ndarray, shape (4, 4)
    """
    # cube index c = mni index + CUBE_OFFSET, so mm = A_mni @ (c - CUBE_OFFSET).
    return MNI_2MM_AFFINE @ from_matvec(np.eye(3), -np.asarray(CUBE_OFFSET, dtype=float))


def is_mni_2mm(shape: tuple[int, ...], affine: np.ndarray, atol: float = 1e-3) -> bool:
    """Whether an image with ``shape`` and ``affine`` lies on the MNI 2 mm grid already."""
    return tuple(shape[:3]) == MNI_2MM_SHAPE and np.allclose(affine, MNI_2MM_AFFINE, atol=atol)


@dataclass(frozen=True)
class CubeAtlas:
    """An atlas on the model cube.

    Attributes
    ----------
    voxel_labels : ndarray, shape (96, 96, 96), int16
        Contiguous region id ``0..R-1`` of each voxel, ``-1`` outside every region.
    brain : ndarray, shape (96, 96, 96), bool
        Template brain used for token bookkeeping: labelled voxels dilated by one voxel.
    region_values : ndarray, shape (R,)
        The atlas label value of each region id, in the order of the label table.
    """

    voxel_labels: np.ndarray
    brain: np.ndarray
    region_values: np.ndarray

    @property
    def n_regions(self) -> int:
        """Number of regions R."""
        return len(self.region_values)


def cube_atlas(atlas: Atlas) -> CubeAtlas:
    """Bring an atlas to the MNI 2 mm grid (nearest neighbour if needed), then to the cube."""
    labels = atlas.resample_to(MNI_2MM_SHAPE, MNI_2MM_AFFINE)  # (91, 109, 91) label values
    voxel_labels = to_cube(atlas.contiguous(labels).astype(np.int16), fill=-1)
    # Dilation lets tokens at the cortical rim, which hold brain signal, count as brain.
    brain = ndimage.binary_dilation(to_cube(labels > 0, fill=False))
    region_values = np.array([region.index for region in atlas.regions])
    return CubeAtlas(voxel_labels=voxel_labels, brain=brain, region_values=region_values)
