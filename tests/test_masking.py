"""Known-answer tests of the masking strategies on a hand-built 24^3 grid with box regions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidsapp.errors import UsageError
from bidsapp.model.masking import (
    BrainRandomMasking,
    RandomMasking,
    RegionMasking,
    RegionTokenOrVoxelMasking,
    RegionVoxelMasking,
    build_masking,
)
from bidsapp.model.regions import RegionGrid

P = 4  # token edge: a 24^3 grid has 6^3 tokens
N_REGIONS = 6


def _hand_volumes() -> tuple[np.ndarray, np.ndarray]:
    """Brain = [4, 20)^3 (token indices 1..4 per axis); regions (voxel boxes):

    - 0: d in [4, 11)            -> majority of tokens d = 1, 2: 2*4*4 = 32 tokens
    - 1: d in [11, 20), h < 12   -> tokens d = 3, 4, h = 1, 2: 16 tokens (+ voxel layer d = 11)
    - 2: d, h in [12, 20), w in [8, 12) -> 4 tokens; w in [4, 8) of that block is unlabelled brain
    - 3: d, h, w in [12, 20) except one voxel -> 8 tokens
    - 4: the single voxel (13, 13, 13): owns no token
    - 5: absent from the grid
    """
    labels = np.full((24, 24, 24), -1, dtype=np.int64)
    labels[4:11, 4:20, 4:20] = 0
    labels[11:20, 4:12, 4:20] = 1
    labels[12:20, 12:20, 8:12] = 2
    labels[12:20, 12:20, 12:20] = 3
    labels[13, 13, 13] = 4
    brain = np.zeros((24, 24, 24), dtype=bool)
    brain[4:20, 4:20, 4:20] = True
    return labels, brain


HAND_TOKEN_COUNTS = {0: 32, 1: 16, 2: 4, 3: 8}  # the 4 regions owning tokens; 60 of 64 brain tokens
N_BRAIN_TOKENS = 64


@pytest.fixture(scope="module")
def grid() -> RegionGrid:
    labels, brain = _hand_volumes()
    return RegionGrid.from_labels(torch.from_numpy(labels), torch.from_numpy(brain), P, N_REGIONS)


def _expand(tokens: np.ndarray) -> np.ndarray:
    """Token grid to voxels by hand: repeat every token p times along each axis."""
    return tokens.repeat(P, -3).repeat(P, -2).repeat(P, -1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_region_grid_token_labels(grid: RegionGrid) -> None:
    expected = np.full((6, 6, 6), -1)
    expected[1:3, 1:5, 1:5] = 0
    expected[3:5, 1:3, 1:5] = 1
    expected[3:5, 3:5, 2] = 2
    expected[3:5, 3:5, 3:5] = 3
    np.testing.assert_array_equal(grid.token_labels.numpy(), expected)
    brain_tokens = np.zeros((6, 6, 6), dtype=bool)
    brain_tokens[1:5, 1:5, 1:5] = True
    np.testing.assert_array_equal(grid.brain_tokens.numpy(), brain_tokens)


def test_region_grid_majority_counts_brain_voxels_and_ties_go_low() -> None:
    labels = torch.full((4, 2, 2), -1)
    labels[:2, :, 0] = 3  # token 0: 2 voxels of region 3 ...
    labels[:2, :, 1] = 1  # ... and 2 of region 1: a tie -> 1
    labels[2:, 0, :] = 2  # token 1: region 2 on non-brain voxels only
    labels[2:, 1, :] = 0  # region 0 on the one brain voxel
    brain = torch.ones(4, 2, 2, dtype=torch.bool)
    brain[2:] = False
    brain[3, 1, 1] = True
    grid = RegionGrid.from_labels(labels, brain, 2, 4)
    assert grid.token_labels.flatten().tolist() == [1, 0]
    assert grid.brain_tokens.flatten().tolist() == [True, True]


def test_roi_hides_exactly_the_tokens_of_drawn_regions(grid: RegionGrid) -> None:
    masking = RegionMasking(grid, 0.5)
    mask = masking(16, 3, _gen())
    assert mask.tokens.shape == (16, 1, 6, 6, 6)
    assert mask.voxels.shape == (16, 1, 24, 24, 24)
    regions = mask.regions.numpy()
    assert (regions.sum(-1) == 2).all()  # round(0.5 * 4 regions owning tokens)
    assert not regions[..., 4:].any()  # regions 4 and 5 own no token
    token_labels = grid.token_labels.numpy()
    for b in range(16):
        drawn = np.flatnonzero(regions[b, 0])
        tokens = np.isin(token_labels, drawn)
        np.testing.assert_array_equal(mask.tokens[b, 0].numpy(), tokens)
        np.testing.assert_array_equal(mask.voxels[b, 0].numpy(), _expand(tokens))


def test_roi_voxel_hides_exactly_the_voxels_of_drawn_regions(grid: RegionGrid) -> None:
    masking = RegionVoxelMasking(grid, 0.6)
    mask = masking(32, 1, _gen())
    regions = mask.regions.numpy()
    assert (regions.sum(-1) == 3).all()  # round(0.6 * 5 regions owning a brain voxel)
    assert regions[..., 4].any()  # the one-voxel region is drawn ...
    assert not regions[..., 5].any()  # ... the absent one never
    labels, brain = _hand_volumes()
    for b in range(32):
        drawn = np.flatnonzero(regions[b, 0])
        voxels = np.isin(labels, drawn)
        np.testing.assert_array_equal(mask.voxels[b, 0].numpy(), voxels)
        # By hand: a token gets the mask token iff it has brain voxels and all are hidden.
        tokens = np.zeros((6, 6, 6), dtype=bool)
        for i, j, k in np.ndindex(6, 6, 6):
            block = np.s_[P * i : P * i + P, P * j : P * j + P, P * k : P * k + P]
            tokens[i, j, k] = brain[block].any() and voxels[block][brain[block]].all()
        np.testing.assert_array_equal(mask.tokens[b, 0].numpy(), tokens)


def test_roi_voxel_partial_token_is_not_mask_token(grid: RegionGrid) -> None:
    regions = torch.zeros(1, 1, N_REGIONS, dtype=torch.bool)
    regions[..., 1] = True  # region 1 also covers voxel layer d = 11 of the d = 2 tokens
    mask = RegionVoxelMasking(grid, 0.5).from_regions(regions)
    assert mask.voxels[0, 0, 11, 4:12, 4:20].all()
    assert not mask.tokens[0, 0, 2].any()
    assert int(mask.tokens.sum()) == 16


def test_token_or_voxel_hides_token_regions_as_roi_and_the_others_by_voxel(grid: RegionGrid) -> None:
    masking = RegionTokenOrVoxelMasking(grid, 0.5)
    # Every region with a brain voxel can be hidden (the one-voxel region 4 too), region 5 not.
    assert masking.eligible.tolist() == [True] * 5 + [False]
    assert masking.token_owned.tolist() == [True] * 4 + [False] * 2
    roi = RegionMasking(grid, 0.5)
    labels, _ = _hand_volumes()
    for drawn in ([0, 2], [1, 3], [0, 1, 2, 3], [2, 4], [4], [1, 4]):
        regions = torch.zeros(1, 1, N_REGIONS, dtype=torch.bool)
        regions[..., drawn] = True
        mask = masking.from_regions(regions)
        by_tokens = roi.from_regions(regions)
        # The token-owning regions are hidden exactly as roi hides them in training ...
        np.testing.assert_array_equal(mask.tokens.numpy(), by_tokens.tokens.numpy())
        # ... and region 4 adds its one voxel, inside a token that stays visible.
        expected = by_tokens.voxels[0, 0].numpy() | (labels == 4) * (4 in drawn)
        np.testing.assert_array_equal(mask.voxels[0, 0].numpy(), expected)
        np.testing.assert_array_equal(mask.regions.numpy(), regions.numpy())


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_roi_token_unit_stops_within_one_region(grid: RegionGrid, ratio: float) -> None:
    mask = RegionMasking(grid, ratio, unit="tokens")(64, 1, _gen(1))
    target = ratio * N_BRAIN_TOKENS
    hidden = mask.tokens.sum((1, 2, 3, 4)).numpy()
    assert (hidden >= target).all()
    for b in range(64):
        drawn = np.flatnonzero(mask.regions[b, 0].numpy())
        assert sum(HAND_TOKEN_COUNTS[r] for r in drawn) == hidden[b]
        # Without the last region taken, the target was not reached yet.
        assert min(hidden[b] - HAND_TOKEN_COUNTS[r] for r in drawn) < target


def test_roi_token_unit_follows_the_noise_order(grid: RegionGrid) -> None:
    # Replay the draw with a plain loop: regions in increasing noise, taken until the hidden
    # tokens reach the target (32 of 64: exactly region 0, so region 0 first means it alone).
    mask = RegionMasking(grid, 0.5, unit="tokens")(64, 1, _gen(3))
    noise = torch.rand((64, 1, N_REGIONS), generator=_gen(3)).numpy()
    for b in range(64):
        hidden, expected = 0, set()
        for r in np.argsort(noise[b, 0]):
            if r in HAND_TOKEN_COUNTS and hidden < 32:
                expected.add(int(r))
                hidden += HAND_TOKEN_COUNTS[r]
        assert set(np.flatnonzero(mask.regions[b, 0].numpy()).tolist()) == expected


def test_roi_voxel_token_unit_counts_brain_voxels(grid: RegionGrid) -> None:
    mask = RegionVoxelMasking(grid, 0.5, unit="tokens")(32, 1, _gen(2))
    _, brain = _hand_volumes()
    hidden = (mask.voxels[:, 0].numpy() & brain).sum((1, 2, 3))
    assert (hidden >= 0.5 * brain.sum()).all()
    assert (hidden < 0.5 * brain.sum() + 7 * 16 * 16).all()  # region 0, the largest, by hand


def test_brain_random_counts_and_never_background(grid: RegionGrid) -> None:
    # unit "regions": roi hides 2 of 4 regions, i.e. on average 1/2 of 60 owned tokens = 30.
    mask = BrainRandomMasking(grid, 0.5)(16, 4, _gen())
    assert mask.regions is None
    assert (mask.tokens.sum((2, 3, 4)) == 30).all()
    assert not (mask.tokens & ~grid.brain_tokens).any()
    np.testing.assert_array_equal(mask.voxels.numpy(), _expand(mask.tokens.numpy()))
    tokens_unit = BrainRandomMasking(grid, 0.5, unit="tokens")(4, 1, _gen())
    assert (tokens_unit.tokens.sum((2, 3, 4)) == 32).all()


def test_random_masking_counts_tokens_over_the_cube(grid: RegionGrid) -> None:
    mask = RandomMasking(grid, 0.5)(8, 2, _gen())
    assert mask.regions is None
    assert (mask.tokens.sum((2, 3, 4)) == 108).all()  # round(0.5 * 216)
    assert (mask.tokens & ~grid.brain_tokens).any()  # background tokens too
    # Only whole tokens: the voxels are the tokens expanded.
    np.testing.assert_array_equal(mask.voxels.numpy(), _expand(mask.tokens.numpy()))


@pytest.mark.parametrize("name", ["roi", "roi-voxel", "random", "brain-random"])
def test_tube_and_random_time(grid: RegionGrid, name: str) -> None:
    tube = build_masking(name, grid, 0.5, time="tube")(2, 5, _gen())
    assert tube.tokens.shape[1] == tube.voxels.shape[1] == 1  # one mask broadcast over frames
    per_frame = build_masking(name, grid, 0.5, time="random")(2, 5, _gen())
    assert per_frame.voxels.shape == (2, 5, 24, 24, 24)
    assert per_frame.tokens.shape == (2, 5, 6, 6, 6)
    assert (per_frame.voxels != per_frame.voxels[:, :1]).any()


@pytest.mark.parametrize("name", ["roi", "roi-voxel", "random", "brain-random"])
def test_same_seed_same_mask(grid: RegionGrid, name: str) -> None:
    masking = build_masking(name, grid, 0.5, time="random")
    first, again, other = masking(3, 4, _gen(7)), masking(3, 4, _gen(7)), masking(3, 4, _gen(8))
    assert torch.equal(first.voxels, again.voxels)
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.voxels, other.voxels)


def test_from_regions_and_brain_fraction(grid: RegionGrid) -> None:
    regions = torch.zeros(2, 1, N_REGIONS, dtype=torch.bool)
    regions[0, 0, 0] = True
    regions[1, 0, [2, 3]] = True
    mask = RegionMasking(grid, 0.5).from_regions(regions)
    assert torch.equal(mask.regions, regions)
    # Region 0: tokens d = 1, 2 -> brain voxels d in [4, 12): 8*16*16 of 16^3.
    # Regions 2 and 3: 4 + 8 tokens of 64 brain voxels each.
    expected = torch.tensor([2048 / 4096, 12 * 64 / 4096])
    torch.testing.assert_close(mask.brain_fraction(grid.brain), expected)
    torch.testing.assert_close(mask.brain_fraction(grid.brain.expand(2, -1, -1, -1)), expected)


def test_build_masking_rejects_bad_settings(grid: RegionGrid) -> None:
    with pytest.raises(UsageError):
        build_masking("blocks", grid, 0.5)
    with pytest.raises(UsageError):
        build_masking("roi", grid, 1.0)
    with pytest.raises(UsageError):
        build_masking("roi", grid, 0.5, unit="voxels")
    with pytest.raises(UsageError):
        build_masking("random", grid, 0.5, time="sometimes")
    assert build_masking("roi-voxel", grid, 0.5).name == "roi-voxel"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_on_cuda_match_seed(grid: RegionGrid) -> None:
    cuda_grid = grid.to("cuda")
    masking = build_masking("roi-voxel", cuda_grid, 0.5, unit="tokens", time="random")
    first = masking(2, 3, torch.Generator("cuda").manual_seed(3))
    again = masking(2, 3, torch.Generator("cuda").manual_seed(3))
    assert first.voxels.is_cuda
    assert torch.equal(first.voxels, again.voxels)
