"""The MNI 2 mm grid, the 96^3 cube and atlas tokens (bidsapp.grid)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.affines import apply_affine

from bidsapp.atlas import Atlas, load_atlas
from bidsapp.grid import (
    CUBE_SHAPE,
    MNI_2MM_AFFINE,
    MNI_2MM_SHAPE,
    cube_affine,
    cube_atlas,
    from_cube,
    is_mni_2mm,
    to_cube,
)
from bidsapp.model.regions import RegionGrid, downsample_labels


@pytest.fixture(scope="module")
def atlas(atlas_dir: Path) -> Atlas:
    return load_atlas(atlas_dir / "AAL3v1_2mm.nii.gz", atlas_dir / "AAL3v1_labels.tsv")


@pytest.fixture(scope="module")
def aal3(atlas: Atlas) -> np.ndarray:
    return np.asarray(atlas.image.dataobj)  # (91, 109, 91) label values


def test_mni_grid_is_the_aal3_grid(atlas_dir: Path) -> None:
    image = nib.load(atlas_dir / "AAL3v1_2mm.nii.gz")
    assert image.shape == MNI_2MM_SHAPE
    np.testing.assert_array_equal(image.affine, MNI_2MM_AFFINE)


@pytest.mark.parametrize(("cube_voxel", "mni_voxel"), [
    ((3, 0, 3), (0, 6, 0)),
    ((93, 95, 93), (90, 101, 90)),
    ((50, 40, 20), (47, 46, 17)),
    ((10, 90, 80), (7, 96, 77)),
])
def test_cube_voxel_is_mni_voxel_minus_3_plus_6_minus_3(
    cube_voxel: tuple[int, int, int], mni_voxel: tuple[int, int, int]
) -> None:
    series = np.random.default_rng(0).normal(size=(*MNI_2MM_SHAPE, 2))
    assert np.array_equal(to_cube(series)[cube_voxel], series[mni_voxel])


def test_padding_and_crop_positions() -> None:
    volume = np.ones(MNI_2MM_SHAPE, dtype=np.int16)
    cube = to_cube(volume, fill=-1)
    assert cube.shape == CUBE_SHAPE and cube.dtype == np.int16
    # x and z: 3 padded voxels before, 2 after; y: no padding.
    for axis in (0, 2):
        profile = np.moveaxis(cube, axis, 0)[:, 40, 40]
        assert profile.tolist() == [-1] * 3 + [1] * 91 + [-1] * 2
    assert (cube[3:94, :, 3:94] == 1).all()


def test_round_trip_is_exact_except_cropped_rows() -> None:
    series = np.random.default_rng(1).normal(size=(*MNI_2MM_SHAPE, 3)).astype(np.float32)
    back = from_cube(to_cube(series), fill=np.nan)
    assert back.shape == series.shape and back.dtype == np.float32
    np.testing.assert_array_equal(back[:, 6:102], series[:, 6:102])
    assert np.isnan(back[:, :6]).all() and np.isnan(back[:, 102:]).all()
    # And the other way round: cube -> MNI -> cube loses only the padding.
    cube = np.arange(np.prod(CUBE_SHAPE)).reshape(CUBE_SHAPE)
    again = to_cube(from_cube(cube), fill=-1)
    np.testing.assert_array_equal(again[3:94, :, 3:94], cube[3:94, :, 3:94])
    assert (again[:3] == -1).all() and (again[:, :, 94:] == -1).all()


def test_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="MNI 2 mm grid"):
        to_cube(np.zeros((97, 115, 97)))
    with pytest.raises(ValueError, match="model cube"):
        from_cube(np.zeros(MNI_2MM_SHAPE))


def test_cube_affine_maps_voxels_to_the_mm_of_their_source() -> None:
    affine = cube_affine()
    cube_voxels = np.array([[0, 0, 0], [3, 0, 3], [48, 57, 39], [95, 95, 95], [17, 80, 60]])
    mni_voxels = cube_voxels + np.array([-3, 6, -3])
    np.testing.assert_allclose(apply_affine(affine, cube_voxels),
                               apply_affine(MNI_2MM_AFFINE, mni_voxels))
    # By hand: cube (0, 0, 0) is MNI voxel (-3, 6, -3) -> (90 + 6, -126 + 12, -72 - 6) mm,
    # and the MNI origin (voxel (45, 63, 36)) is cube voxel (48, 57, 39).
    np.testing.assert_allclose(apply_affine(affine, [0, 0, 0]), [96, -114, -78])
    np.testing.assert_allclose(apply_affine(affine, [48, 57, 39]), [0, 0, 0])


def test_is_mni_2mm() -> None:
    assert is_mni_2mm(MNI_2MM_SHAPE, MNI_2MM_AFFINE)
    assert is_mni_2mm((*MNI_2MM_SHAPE, 200), MNI_2MM_AFFINE.astype(np.float32))
    fmriprep_res2 = np.diag([2.0, 2, 2, 1])
    fmriprep_res2[:3, 3] = (-96, -132, -78)
    assert not is_mni_2mm((97, 115, 97), fmriprep_res2)
    assert not is_mni_2mm(MNI_2MM_SHAPE, np.diag([2.0, 2, 2, 1]))  # not x-flipped
    assert not is_mni_2mm((91, 109, 90), MNI_2MM_AFFINE)


def test_crop_pad_keeps_every_atlas_label_at_2mm(aal3: np.ndarray) -> None:
    labels, counts = np.unique(aal3[aal3 > 0], return_counts=True)
    assert len(labels) == 166
    cube_labels, cube_counts = np.unique((cube := to_cube(aal3))[cube > 0], return_counts=True)
    np.testing.assert_array_equal(cube_labels, labels)
    # Not one AAL3 voxel lies in the cropped y rows 0..5 and 102..108.
    np.testing.assert_array_equal(cube_counts, counts)


def test_cube_atlas(atlas: Atlas, aal3: np.ndarray) -> None:
    cube = cube_atlas(atlas)
    assert cube.voxel_labels.shape == CUBE_SHAPE and cube.voxel_labels.dtype == np.int16
    assert cube.n_regions == 166
    np.testing.assert_array_equal(cube.region_values, [r.index for r in atlas.regions])
    labelled = cube.voxel_labels >= 0
    # Contiguous ids map back to the label values voxel by voxel.
    np.testing.assert_array_equal(cube.region_values[cube.voxel_labels[labelled]],
                                  to_cube(aal3)[labelled])
    assert set(np.unique(cube.voxel_labels)) == set(range(-1, 166))
    # The brain is the labelled voxels grown by one voxel: it holds them and touches them all.
    assert cube.brain[labelled].all() and cube.brain.sum() > labelled.sum()
    grown = cube.brain & ~labelled
    neighbours = sum(np.roll(labelled, shift, axis) for axis in range(3) for shift in (-1, 1))
    assert (neighbours[grown] > 0).all()


def test_cube_atlas_resamples_an_atlas_on_another_grid(atlas: Atlas, aal3: np.ndarray) -> None:
    # The same atlas stored the RAS way (x not flipped) must give the same cube.
    ras = MNI_2MM_AFFINE.copy()
    ras[0] = [2, 0, 0, -90]
    flipped = Atlas(name="AAL3v1", image=nib.Nifti1Image(aal3[::-1].astype(np.int16), ras),
                    regions=atlas.regions, source="test")
    np.testing.assert_array_equal(cube_atlas(flipped).voxel_labels,
                                  cube_atlas(atlas).voxel_labels)


def test_downsample_labels_by_hand() -> None:
    labels = np.full((4, 4, 4), -1, dtype=np.int16)
    brain = np.zeros((4, 4, 4), dtype=bool)
    # Block (0, 0, 0): three 1s beat two 0s; its three unlabelled voxels do not vote.
    block = labels[:2, :2, :2].reshape(-1)
    block[:5] = [0, 0, 1, 1, 1]
    labels[:2, :2, :2] = block.reshape(2, 2, 2)
    brain[:2, :2, :2] = True
    # Block (1, 0, 0): a tie 2 vs 3 goes to the lowest id; half brain counts as brain.
    labels[2:, 0, 0] = 3
    labels[2:, 1, 0] = 2
    brain[2:, :, 0] = True
    # Block (0, 1, 0): labelled, but only outside the brain -> -1; 3/8 brain -> not brain.
    labels[:2, 3, :2] = 4
    brain[0, 2, :2] = True
    brain[1, 2, 0] = True
    coarse, coarse_brain = downsample_labels(labels, brain, 2)
    assert coarse.shape == (2, 2, 2) and coarse.dtype == np.int16
    assert coarse[0, 0, 0] == 1 and coarse[1, 0, 0] == 2 and coarse[0, 1, 0] == -1
    assert coarse_brain[0, 0, 0] and coarse_brain[1, 0, 0] and not coarse_brain[0, 1, 0]
    assert (coarse[:, :, 1] == -1).all() and not coarse_brain[:, :, 1].any()


def test_downsample_labels_factor_one_is_identity() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(-1, 5, size=(6, 6, 6)).astype(np.int16)
    brain = rng.random((6, 6, 6)) > 0.3
    same_labels, same_brain = downsample_labels(labels, brain, 1)
    np.testing.assert_array_equal(same_labels, labels)
    np.testing.assert_array_equal(same_brain, brain)
    with pytest.raises(ValueError, match="does not divide"):
        downsample_labels(labels, brain, 4)


def token_grid(labels: np.ndarray, brain: np.ndarray, patch: int) -> RegionGrid:
    n_regions = int(labels.max()) + 1
    return RegionGrid.from_labels(torch.from_numpy(labels.astype(np.int64)),
                                  torch.from_numpy(brain), patch, n_regions)


def test_token_labels_by_hand() -> None:
    labels = np.full((4, 4, 4), -1, dtype=np.int16)
    brain = np.zeros((4, 4, 4), dtype=bool)
    labels[0, 0, 0] = 7  # token (0, 0, 0): one brain voxel of region 7 -> region 7, brain
    brain[0, 0, 0] = True
    labels[2:, 2:, 2:] = 5  # token (1, 1, 1): region 5 outside the brain, one unlabelled brain
    brain[3, 3, 3] = False  # voxel -> no region, but still a brain token
    brain[2, 2, 2] = True
    labels[2, 2, 2] = -1
    grid = token_grid(labels, brain, 2)
    tokens, brain_tokens = grid.token_labels.numpy(), grid.brain_tokens.numpy()
    assert tokens.shape == (2, 2, 2)
    assert tokens[0, 0, 0] == 7 and brain_tokens[0, 0, 0]
    assert tokens[1, 1, 1] == -1 and brain_tokens[1, 1, 1]
    assert brain_tokens.sum() == 2 and (tokens >= 0).sum() == 1
    assert grid.regions_without_tokens() == [0, 1, 2, 3, 4, 5, 6]


def test_token_labels_match_a_loop_over_tokens() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(-1, 4, size=(8, 12, 8)).astype(np.int16)
    brain = rng.random(labels.shape) > 0.4
    grid = token_grid(labels, brain, 4)
    tokens, brain_tokens = grid.token_labels.numpy(), grid.brain_tokens.numpy()
    for index in np.ndindex(tokens.shape):
        block = tuple(slice(4 * i, 4 * i + 4) for i in index)
        votes = Counter(labels[block][brain[block] & (labels[block] >= 0)].tolist())
        best = max(votes.values(), default=0)
        expected = min((k for k, v in votes.items() if v == best), default=-1)
        assert tokens[index] == expected
        assert brain_tokens[index] == brain[block].any()


def test_regions_without_tokens_on_aal3(atlas: Atlas) -> None:
    cube = cube_atlas(atlas)
    names = np.array([r.name for r in atlas.regions])
    grid = RegionGrid.from_labels(torch.from_numpy(cube.voxel_labels.astype(np.int64)),
                                  torch.from_numpy(cube.brain), 6, cube.n_regions)
    tokens, brain_tokens = grid.token_labels.numpy(), grid.brain_tokens.numpy()
    assert tokens.shape == (16, 16, 16) and brain_tokens[tokens >= 0].all()
    missing = set(names[grid.regions_without_tokens()])
    # At 12 mm tokens the small thalamic and brainstem nuclei own no token; lobes all do.
    assert len(missing) == 28
    assert {"LC_L", "LC_R", "Raphe_D", "VTA_L", "Thal_LGN_L", "N_Acc_L"} <= missing
    assert not missing & {"Precentral_L", "Hippocampus_R", "Thal_PuM_L", "Cerebelum_Crus1_L"}
    # Presets at 4 mm (2x coarser) with patch 4: 16 mm tokens, more regions lose out.
    coarse, coarse_brain = downsample_labels(cube.voxel_labels, cube.brain, 2)
    coarse_grid = RegionGrid.from_labels(torch.from_numpy(coarse.astype(np.int64)),
                                         torch.from_numpy(coarse_brain), 4, cube.n_regions)
    assert coarse_grid.grid_shape == (12, 12, 12)
    coarse_missing = set(names[coarse_grid.regions_without_tokens()])
    assert len(coarse_missing) == 52
    assert {"Amygdala_L", "Heschl_R", "Vermis_6"} <= coarse_missing
