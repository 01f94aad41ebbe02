"""Masking strategies: which tokens (or voxels) of a 4D window are hidden from the encoder.

Every strategy draws, for a batch of ``B`` windows of ``T`` frames, a :class:`Mask` at the model's
working resolution. Draws are vectorised on the device of the :class:`RegionGrid` (no Python loop
over samples) and take every random number from the given ``torch.Generator``, so one seed gives
one mask. The strategies are backbone-independent: they only know the token grid and the labels.

============  ===============================================================================
name          what is hidden
============  ===============================================================================
roi           whole atlas regions: every token whose majority region was drawn (default)
roi-voxel     whole atlas regions, voxel-exact: the voxels of the drawn regions
random        tokens at random over the whole cube (the NeuroSTORM / SimMIM baseline)
brain-random  tokens at random among brain tokens, at the same expected fraction as ``roi``
============  ===============================================================================

``mask_time="tube"`` draws one mask per window and repeats it over frames (``Tm = 1``);
``"random"`` draws one per frame (``Tm = T``).

Attribution, not training, also uses :class:`RegionTokenOrVoxelMasking`: a region by its tokens
where it owns some, by its voxels where it owns none, so that every region can be hidden.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F

from bidsapp.errors import BadDataError, UsageError
from bidsapp.model.layers import blocks, depth_to_space
from bidsapp.model.regions import RegionGrid

MaskTime = Literal["tube", "random"]
RatioUnit = Literal["regions", "tokens"]


def _tokens_to_voxels(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Expand ``(..., gd, gh, gw)`` to ``(..., D, H, W)``: each voxel takes its token's value."""
    return depth_to_space(tokens[..., None].expand(*tokens.shape, patch_size**3), patch_size)[..., 0]


@dataclass
class Mask:
    """What a strategy hides, at working resolution.

    Attributes
    ----------
    tokens : torch.BoolTensor, shape (B, Tm, gd, gh, gw)
        True = the token is replaced by the mask token. ``Tm`` is 1 (tube, broadcast over frames)
        or ``T``.
    voxels : torch.BoolTensor, shape (B, Tm, D, H, W)
        True = the voxel is hidden from the input; the loss is on hidden brain voxels.
    regions : torch.BoolTensor, shape (B, Tm, R), or None
        The regions drawn (region strategies); None for the random strategies.
    """

    tokens: torch.Tensor
    voxels: torch.Tensor
    regions: torch.Tensor | None = None

    def brain_fraction(self, brain: torch.Tensor) -> torch.Tensor:
        """Fraction of brain voxels hidden, per sample and averaged over frames.

        Parameters
        ----------
        brain : torch.BoolTensor, shape (D, H, W) or (B, D, H, W)
            The brain at working resolution.

        Returns
        -------
        torch.Tensor, shape (B,)
        """
        brain = brain.bool()
        if brain.ndim == 3:
            brain = brain.unsqueeze(0)
        brain = brain.unsqueeze(1)  # (B or 1, 1, D, H, W)
        hidden = (self.voxels & brain).sum((2, 3, 4)).float()  # (B, Tm)
        return (hidden / brain.sum((2, 3, 4)).clamp_min(1)).mean(1)


class MaskingStrategy(Protocol):
    """Draws a :class:`Mask` for a batch; see :func:`build_masking`."""

    name: str

    def __call__(
        self, batch_size: int, n_frames: int, generator: torch.Generator | None = None
    ) -> Mask:
        """A mask for ``batch_size`` windows of ``n_frames`` frames, drawn from ``generator``."""
        ...


def _check_unit(unit: str) -> None:
    if unit not in ("regions", "tokens"):
        raise UsageError(f"mask ratio unit must be 'regions' or 'tokens'; got {unit!r}")


def _scatter_smallest(noise: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` smallest entries of the last dimension (``inf`` entries come last)."""
    chosen = torch.zeros_like(noise, dtype=torch.bool)
    return chosen.scatter_(-1, noise.topk(k, dim=-1, largest=False).indices, True)


class _Masking:
    """What every strategy shares: the grid, the ratio, the time mode and the noise source."""

    name: ClassVar[str]

    def __init__(self, region_grid: RegionGrid, mask_ratio: float, *, time: MaskTime = "tube"):
        if not 0.0 < mask_ratio < 1.0:
            raise UsageError(f"mask ratio must be between 0 and 1 (exclusive); got {mask_ratio}")
        if time not in ("tube", "random"):
            raise UsageError(f"mask time must be 'tube' or 'random'; got {time!r}")
        self.grid = region_grid
        self.mask_ratio = float(mask_ratio)
        self.time = time

    def _noise(
        self, batch_size: int, n_frames: int, n: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Uniform noise ``(B, Tm, n)`` on the grid's device (``generator`` must live there)."""
        frames = n_frames if self.time == "random" else 1
        return torch.rand(
            (batch_size, frames, n), generator=generator, device=self.grid.device
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mask_ratio={self.mask_ratio}, time={self.time!r})"


class RandomMasking(_Masking):
    """``round(ratio * gd*gh*gw)`` tokens at random over the whole cube (NeuroSTORM baseline)."""

    name = "random"

    def __init__(self, region_grid: RegionGrid, mask_ratio: float, *, time: MaskTime = "tube"):
        super().__init__(region_grid, mask_ratio, time=time)
        self.n_hidden = max(1, round(self.mask_ratio * region_grid.token_labels.numel()))

    def __call__(
        self, batch_size: int, n_frames: int, generator: torch.Generator | None = None
    ) -> Mask:
        """A mask for ``batch_size`` windows of ``n_frames`` frames, drawn from ``generator``."""
        grid = self.grid
        noise = self._noise(batch_size, n_frames, grid.token_labels.numel(), generator)
        tokens = _scatter_smallest(noise, self.n_hidden).unflatten(-1, grid.grid_shape)
        return Mask(tokens, _tokens_to_voxels(tokens, grid.patch_size), None)


class BrainRandomMasking(_Masking):
    """Brain tokens at random, as many (exactly, per sample) as ``roi`` hides on average.

    With ``unit="regions"``, ``roi`` draws ``k`` of the ``R_tok`` regions that own tokens, so it
    hides on average ``k / R_tok`` of the region-owned brain tokens; this strategy hides that
    fraction of all brain tokens (``k / R_tok ~= mask_ratio``). With ``unit="tokens"`` it hides
    ``mask_ratio`` of the brain tokens. Background tokens are never hidden.
    """

    name = "brain-random"

    def __init__(
        self,
        region_grid: RegionGrid,
        mask_ratio: float,
        *,
        unit: RatioUnit = "regions",
        time: MaskTime = "tube",
    ):
        super().__init__(region_grid, mask_ratio, time=time)
        _check_unit(unit)
        n_brain = int(region_grid.brain_tokens.sum())
        if n_brain == 0:
            raise BadDataError("no token of the model grid holds brain voxels")
        fraction = self.mask_ratio
        if unit == "regions":
            roi = RegionMasking(region_grid, mask_ratio, unit="regions", time=time)
            owned = int(roi.sizes.sum())
            fraction = roi.n_drawn / int(roi.eligible.sum()) * owned / n_brain
        self.n_hidden = max(1, round(fraction * n_brain))

    def __call__(
        self, batch_size: int, n_frames: int, generator: torch.Generator | None = None
    ) -> Mask:
        """A mask for ``batch_size`` windows of ``n_frames`` frames, drawn from ``generator``."""
        grid = self.grid
        noise = self._noise(batch_size, n_frames, grid.brain_tokens.numel(), generator)
        # Background tokens sort last, so they are never among the n_hidden <= n_brain chosen.
        noise = noise.masked_fill(~grid.brain_tokens.flatten(), float("inf"))
        tokens = _scatter_smallest(noise, self.n_hidden).unflatten(-1, grid.grid_shape)
        return Mask(tokens, _tokens_to_voxels(tokens, grid.patch_size), None)


class _RegionDraw(_Masking, ABC):
    """Draws whole regions without replacement; subclasses say what a region hides.

    ``sizes`` (R,) is what each region hides (tokens or brain voxels) and ``total`` the amount
    that ``mask_ratio`` refers to with ``unit="tokens"``. Regions of size 0 are never drawn.
    """

    unit_noun: ClassVar[str]

    def __init__(
        self,
        region_grid: RegionGrid,
        mask_ratio: float,
        *,
        unit: RatioUnit = "regions",
        time: MaskTime = "tube",
    ):
        super().__init__(region_grid, mask_ratio, time=time)
        _check_unit(unit)
        self.unit = unit
        self.sizes, self.total = self._sizes()  # (R,), scalar
        self.eligible = self.sizes > 0  # (R,)
        n_eligible = int(self.eligible.sum())
        if n_eligible == 0:
            raise BadDataError(f"no atlas region owns a {self.unit_noun} of the model grid")
        self.n_drawn = min(n_eligible, max(1, round(self.mask_ratio * n_eligible)))

    @abstractmethod
    def _sizes(self) -> tuple[torch.Tensor, int]:
        """What each region hides ``(R,)`` and the amount a ratio in unit "tokens" refers to."""

    @abstractmethod
    def from_regions(self, regions: torch.Tensor) -> Mask:
        """The mask that hides the given regions (the same code path as a random draw)."""

    def _check_regions(self, regions: torch.Tensor) -> torch.Tensor:
        if regions.ndim != 3 or regions.shape[-1] != self.grid.n_regions:
            raise ValueError(
                f"regions must be (B, Tm, {self.grid.n_regions}); got {tuple(regions.shape)}"
            )
        # Column R is the "no region" label -1 (index -1 wraps onto it), never hidden.
        return F.pad(regions.bool().to(self.grid.device), (0, 1))  # (B, Tm, R+1)

    def draw_regions(
        self, batch_size: int, n_frames: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw regions: ``(B, Tm, R)`` bool, True = drawn."""
        noise = self._noise(batch_size, n_frames, self.grid.n_regions, generator)
        noise = noise.masked_fill(~self.eligible, float("inf"))  # (B, Tm, R)
        if self.unit == "regions":
            return _scatter_smallest(noise, self.n_drawn)
        # Visit regions in random order; take each one while the amount hidden before it is still
        # below the target, so the total stops within one region of the target.
        order = noise.argsort(dim=-1)  # (B, Tm, R)
        sizes = self.sizes[order]  # (B, Tm, R)
        before = sizes.cumsum(-1) - sizes
        # In float64: an integer tensor compared with a Python float is compared in float32, where
        # a tiny target rounds to 0 and no region would be taken.
        take = (before.double() < self.mask_ratio * self.total) & self.eligible[order]
        return torch.zeros_like(take).scatter_(-1, order, take)

    def __call__(
        self, batch_size: int, n_frames: int, generator: torch.Generator | None = None
    ) -> Mask:
        return self.from_regions(self.draw_regions(batch_size, n_frames, generator))


class RegionMasking(_RegionDraw):
    """ROI-guided masking: whole atlas regions, as all the tokens they own.

    ``unit="regions"`` hides ``round(ratio * R_tok)`` regions per sample, ``R_tok`` being the
    regions that own at least one token; ``unit="tokens"`` draws regions until the hidden brain
    tokens reach ``ratio`` of the brain tokens. Regions owning no token are never drawn.
    """

    name = "roi"
    unit_noun = "token"

    def _sizes(self) -> tuple[torch.Tensor, int]:
        labels = self.grid.token_labels.flatten()
        sizes = torch.bincount(labels[labels >= 0], minlength=self.grid.n_regions)
        return sizes, int(self.grid.brain_tokens.sum())

    def from_regions(self, regions: torch.Tensor) -> Mask:
        """The mask of the given regions.

        Parameters
        ----------
        regions : torch.BoolTensor, shape (B, Tm, R)

        Returns
        -------
        Mask
            Tokens whose label is among the regions, and all their voxels.
        """
        padded = self._check_regions(regions)
        tokens = padded[..., self.grid.token_labels]  # (B, Tm, gd, gh, gw)
        return Mask(tokens, _tokens_to_voxels(tokens, self.grid.patch_size), padded[..., :-1])


class RegionVoxelMasking(_RegionDraw):
    """ROI-guided masking at voxel precision: exactly the voxels of the drawn regions.

    Small regions that own no token are kept (``R_tok`` counts regions owning a brain voxel).
    Tokens whose brain voxels are all hidden get the mask token; partly hidden tokens see their
    visible voxels. ``unit="tokens"`` counts brain voxels: regions are drawn until the hidden
    brain voxels reach ``ratio`` of the brain.
    """

    name = "roi-voxel"
    unit_noun = "brain voxel"

    def _sizes(self) -> tuple[torch.Tensor, int]:
        labels = self.grid.voxel_labels[self.grid.brain]
        sizes = torch.bincount(labels[labels >= 0], minlength=self.grid.n_regions)
        return sizes, int(self.grid.brain.sum())

    def from_regions(self, regions: torch.Tensor) -> Mask:
        """The mask of the given regions.

        Parameters
        ----------
        regions : torch.BoolTensor, shape (B, Tm, R)

        Returns
        -------
        Mask
            Voxels whose label is among the regions; tokens with brain voxels all hidden.
        """
        padded = self._check_regions(regions)
        return self._voxel_mask(padded[..., self.grid.voxel_labels], padded)  # (B, Tm, D, H, W)

    def _voxel_mask(self, voxels: torch.Tensor, padded: torch.Tensor) -> Mask:
        """The mask hiding ``voxels``: tokens whose brain voxels are all hidden get the mask token."""
        grid = self.grid
        visible_brain = blocks(~voxels & grid.brain, grid.patch_size).any(-1)  # (B, Tm, g...)
        return Mask(grid.brain_tokens & ~visible_brain, voxels, padded[..., :-1])


class RegionTokenOrVoxelMasking(RegionVoxelMasking):
    """Whole atlas regions: as their tokens where they own some, voxel by voxel where they own none.

    What attribution hides in a model trained with token masks: a region that owns a token is
    hidden exactly as ``roi`` hides it in training, and a region too small to own one (52 of
    AAL3's 166 at ``tiny``, the amygdalae among them) is hidden voxel by voxel, inside tokens that
    stay visible, as ``roi-voxel`` does. Every region with a brain voxel can then be hidden;
    ``token_owned`` says which way. Tokens whose brain voxels are all hidden get the mask token.
    """

    name = "roi-token-or-voxel"

    def _sizes(self) -> tuple[torch.Tensor, int]:
        labels = self.grid.token_labels.flatten()
        self.token_owned = torch.bincount(labels[labels >= 0],
                                          minlength=self.grid.n_regions) > 0  # (R,)
        return super()._sizes()

    def from_regions(self, regions: torch.Tensor) -> Mask:
        """The mask of the given regions.

        Parameters
        ----------
        regions : torch.BoolTensor, shape (B, Tm, R)

        Returns
        -------
        Mask
            The tokens of the token-owning regions and all their voxels, plus the voxels of the
            regions that own no token.
        """
        grid = self.grid
        padded = self._check_regions(regions)                         # (B, Tm, R+1)
        owned = F.pad(self.token_owned, (0, 1))                        # (R+1,), "no region" last
        tokens = (padded & owned)[..., grid.token_labels]              # (B, Tm, gd, gh, gw)
        voxels = (_tokens_to_voxels(tokens, grid.patch_size)
                  | (padded & ~owned)[..., grid.voxel_labels])         # (B, Tm, D, H, W)
        # A token-owning region's tokens hold brain voxels, all hidden: they get the mask token.
        return self._voxel_mask(voxels, padded)


def build_masking(
    name: str,
    region_grid: RegionGrid,
    mask_ratio: float,
    *,
    unit: RatioUnit = "regions",
    time: MaskTime = "tube",
) -> MaskingStrategy:
    """Build a masking strategy by name.

    Parameters
    ----------
    name : {"roi", "roi-voxel", "random", "brain-random"}
        The strategy (see the module docstring).
    region_grid : RegionGrid
        Labels at working resolution and on the token grid.
    mask_ratio : float
        In (0, 1): the fraction of regions (``unit="regions"``) or tokens hidden.
    unit : {"regions", "tokens"}
        What ``mask_ratio`` counts for the region strategies (and ``brain-random``, which
        matches ``roi``); ``random`` always counts tokens.
    time : {"tube", "random"}
        One mask for all frames, or one per frame.
    """
    if name == "random":
        return RandomMasking(region_grid, mask_ratio, time=time)
    if name == "brain-random":
        return BrainRandomMasking(region_grid, mask_ratio, unit=unit, time=time)
    if name == "roi":
        return RegionMasking(region_grid, mask_ratio, unit=unit, time=time)
    if name == "roi-voxel":
        return RegionVoxelMasking(region_grid, mask_ratio, unit=unit, time=time)
    raise UsageError(
        f"unknown masking {name!r}; choose one of roi, roi-voxel, random, brain-random"
    )
