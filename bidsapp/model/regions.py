"""Atlas regions on a model's grids: the labels that region-guided masking hides or keeps.

The atlas on the 96^3 cube (:mod:`bidsapp.grid`) is summarised per block (working voxel, token) by
majority vote (:func:`block_majority`): :func:`downsample_labels` gives the working grid,
:meth:`RegionGrid.from_labels` the token grid. The masking strategies (:mod:`.masking`) read a
:class:`RegionGrid` and never change it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bidsapp.errors import BadDataError
from bidsapp.model.layers import blocks


def block_majority(
    voxel_labels: torch.Tensor, brain: torch.Tensor, factor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority region among the brain voxels of each ``factor^3`` block, and its brain voxels.

    Parameters
    ----------
    voxel_labels : torch.LongTensor, shape (D, H, W)
        Region ids ``>= 0``, -1 = no region.
    brain : torch.BoolTensor, shape (D, H, W)
    factor : int
        Block edge; must divide D, H and W.

    Returns
    -------
    majority : torch.LongTensor, shape (D/f, H/f, W/f)
        Most frequent id among the labelled brain voxels (ties go to the lowest id), -1 if none.
    brain_count : torch.LongTensor, shape (D/f, H/f, W/f)
        Brain voxels of the block.
    """
    if voxel_labels.shape != brain.shape:
        raise ValueError(f"labels {tuple(voxel_labels.shape)} and brain {tuple(brain.shape)} "
                         "differ in shape")
    if factor < 1 or any(n % factor for n in voxel_labels.shape):
        raise ValueError(f"factor {factor} does not divide the volume shape "
                         f"{tuple(voxel_labels.shape)}")
    labels = blocks(voxel_labels.long(), factor)  # (gd, gh, gw, f^3)
    inside = blocks(brain.bool(), factor)  # (gd, gh, gw, f^3)
    grid = labels.shape[:3]
    block, voxel = (inside & (labels >= 0)).flatten(0, 2).nonzero(as_tuple=True)  # (V,) votes
    ids = labels.flatten(0, 2)[block, voxel]
    n_ids = int(ids.max()) + 1 if ids.numel() else 1
    # Count each (block, id) pair; per block keep the largest count, then the lowest id, as the
    # largest score (scores of real pairs are >= n_ids > 0).
    pairs, counts = torch.unique(block * n_ids + ids, return_counts=True)
    score = counts * n_ids + (n_ids - 1 - pairs % n_ids)
    best = torch.full((math.prod(grid),), -1, dtype=torch.long, device=labels.device)
    best.scatter_reduce_(0, pairs.div(n_ids, rounding_mode="floor"), score, "amax")
    majority = torch.where(best >= 0, n_ids - 1 - best % n_ids, -1)
    return majority.view(grid), inside.sum(-1)


def downsample_labels(
    voxel_labels: np.ndarray, brain: np.ndarray, factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """Coarsen a label volume and its brain mask by ``factor`` along every axis.

    Parameters
    ----------
    voxel_labels : ndarray, shape (D, H, W), int
        Region ids ``0..R-1`` or -1.
    brain : ndarray, shape (D, H, W), bool
    factor : int
        Block edge; must divide D, H and W. 1 returns copies of the inputs.

    Returns
    -------
    labels : ndarray, shape (D/f, H/f, W/f), int16
        Majority id among the labelled brain voxels of each block (ties -> lowest id; -1 if none).
    brain : ndarray, shape (D/f, H/f, W/f), bool
        Blocks at least half of whose voxels are brain.
    """
    if factor == 1:
        return voxel_labels.astype(np.int16), brain.astype(bool)
    majority, count = block_majority(torch.from_numpy(voxel_labels.astype(np.int64)),
                                     torch.from_numpy(brain.astype(bool)), factor)
    return majority.numpy().astype(np.int16), (2 * count >= factor**3).numpy()


@dataclass(frozen=True, eq=False)
class RegionGrid:
    """Atlas regions on the working grid and on the token grid.

    Build it with :meth:`from_labels`; strategies read it and never change it.

    Attributes
    ----------
    voxel_labels : torch.LongTensor, shape (D, H, W)
        Contiguous region id in ``[0, R)`` per voxel, -1 outside every region.
    token_labels : torch.LongTensor, shape (gd, gh, gw)
        The region holding most of the token's brain voxels (ties go to the lowest id), -1 if none.
    brain_tokens : torch.BoolTensor, shape (gd, gh, gw)
        The token holds at least one brain voxel.
    patch_size : int
        Token edge ``p`` in working-resolution voxels.
    n_regions : int
        Number of regions ``R``.
    brain : torch.BoolTensor, shape (D, H, W)
        The brain at working resolution (decides which tokens ``roi-voxel`` hides completely).
    """

    voxel_labels: torch.Tensor
    token_labels: torch.Tensor
    brain_tokens: torch.Tensor
    patch_size: int
    n_regions: int
    brain: torch.Tensor

    @classmethod
    def from_labels(
        cls,
        voxel_labels: torch.Tensor,
        brain: torch.Tensor,
        patch_size: int,
        n_regions: int,
    ) -> RegionGrid:
        """Compute the token labels (majority region over brain voxels) and the brain tokens.

        Parameters
        ----------
        voxel_labels : torch.LongTensor, shape (D, H, W)
            Contiguous region ids, -1 = no region.
        brain : torch.BoolTensor, shape (D, H, W)
            Brain voxels at working resolution.
        patch_size : int
            Token edge ``p``; ``D``, ``H`` and ``W`` must be multiples of it.
        n_regions : int
            Number of regions ``R``; every label must be in ``[-1, R)``.
        """
        if voxel_labels.ndim != 3 or voxel_labels.shape != brain.shape:
            raise ValueError(
                f"voxel_labels {tuple(voxel_labels.shape)} and brain {tuple(brain.shape)} "
                "must be the same (D, H, W) volume"
            )
        if any(size % patch_size for size in voxel_labels.shape):
            raise ValueError(f"grid {tuple(voxel_labels.shape)} is not a multiple of {patch_size}")
        labels = voxel_labels.long()
        if labels.numel() and (labels.min() < -1 or labels.max() >= n_regions):
            raise BadDataError(f"region labels must lie in [-1, {n_regions}); got other values")
        brain = brain.bool()
        token_labels, brain_count = block_majority(labels, brain, patch_size)  # (gd, gh, gw)
        return cls(
            voxel_labels=labels,
            token_labels=token_labels,
            brain_tokens=brain_count > 0,
            patch_size=patch_size,
            n_regions=n_regions,
            brain=brain,
        )

    @property
    def device(self) -> torch.device:
        """Where the grid (and every mask drawn from it) lives."""
        return self.voxel_labels.device

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Token grid ``(gd, gh, gw)``."""
        return tuple(self.token_labels.shape)

    def regions_without_tokens(self) -> list[int]:
        """Sorted ids of the regions that own no token (too small for the patch size)."""
        owned = torch.bincount(self.token_labels[self.token_labels >= 0].flatten(),
                               minlength=self.n_regions)
        return torch.nonzero(owned == 0).flatten().tolist()

    def to(self, device: torch.device | str) -> RegionGrid:
        """Return a copy on ``device``."""
        return RegionGrid(
            voxel_labels=self.voxel_labels.to(device),
            token_labels=self.token_labels.to(device),
            brain_tokens=self.brain_tokens.to(device),
            patch_size=self.patch_size,
            n_regions=self.n_regions,
            brain=self.brain.to(device),
        )
