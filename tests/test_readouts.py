"""Region readouts and the connectivity baseline (bidsapp.readouts) on hand-computable inputs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from nilearn.connectome import ConnectivityMeasure
from nilearn.maskers import NiftiLabelsMasker
from sklearn.covariance import EmpiricalCovariance

from bidsapp.atlas import load_atlas
from bidsapp.cache import PreprocessParams
from bidsapp.demo import SPLIT_REGIONS
from bidsapp.grid import (
    MNI_2MM_AFFINE,
    MNI_2MM_SHAPE,
    CubeAtlas,
    cube_affine,
    cube_atlas,
    from_cube,
)
from bidsapp.preprocess import prepare_run
from bidsapp.readouts import (
    DispersionSums,
    RegionPooling,
    correlation_matrix,
    dispersion_weights,
    edge_regions,
    feature_correlation,
    input_token_signals,
    region_embedding,
    region_timeseries,
    vectorize,
    within_region_dispersion,
)


def _cube(labels: np.ndarray, n_regions: int) -> CubeAtlas:
    return CubeAtlas(voxel_labels=labels.astype(np.int16), brain=labels >= 0,
                     region_values=np.arange(1, n_regions + 1))


def test_region_pooling_weights_tokens_by_the_share_of_region_voxels() -> None:
    # Tokens of 48 cube voxels: a 2^3 token grid. Region 0 lies in token (0,0,0) only; region 1
    # has 3 voxels in token (0,0,0) and 1 voxel in token (1,1,1); region 2 has no voxel.
    labels = np.full((96, 96, 96), -1)
    labels[0:2, 0:2, 0:2] = 0
    labels[10, 10, 10:13] = 1
    labels[60, 60, 60] = 1
    pooling = RegionPooling.from_atlas(_cube(labels, 3), token_edge=48)
    tokens = torch.zeros(2, 2, 2, 2, 3)  # (T', gd, gh, gw, C)
    tokens[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    tokens[:, 1, 1, 1] = torch.tensor([5.0, 6.0, 7.0])
    tokens[1] *= 2  # the second frame doubles
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    pooled = pooling(tokens, valid)  # (T', R, C)
    assert pooled.shape == (2, 3, 3)
    expected = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(pooled[0, 0], expected)
    torch.testing.assert_close(pooled[0, 1], 0.75 * expected
                               + 0.25 * torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64))
    torch.testing.assert_close(pooled[1, 1], 2 * pooled[0, 1])
    assert torch.isnan(pooled[:, 2]).all()
    # A token without features (vit4d background) is left out and the weights renormalised.
    valid[1, 1, 1] = False
    torch.testing.assert_close(pooling(tokens, valid)[0, 1], expected)


def test_every_aal3_region_gets_features_at_the_tiny_token_size(atlas_dir: Path) -> None:
    # Regions too small to own a token (52 at tiny) still get a weighted share of tokens.
    cube = cube_atlas(load_atlas(atlas_dir / "AAL3v1_2mm.nii.gz", atlas_dir / "AAL3v1_labels.tsv"))
    pooling = RegionPooling.from_atlas(cube, token_edge=8)
    totals = torch.zeros(cube.n_regions, dtype=torch.float64).index_add_(0, pooling.regions,
                                                                         pooling.weights)
    torch.testing.assert_close(totals, torch.ones(cube.n_regions, dtype=torch.float64))


def test_region_embedding_and_feature_correlation_on_known_features() -> None:
    rng = np.random.default_rng(0)
    n_frames, n_channels = 200, 4
    course = rng.normal(size=(n_frames, 1))
    other = rng.normal(size=(n_frames, 1))
    gains = np.array([1.0, -2.0, 0.5, 3.0])
    features = np.stack([
        2.0 + course * gains,                  # region 0: the course in every channel
        -1.0 + 3 * course * gains,             # region 1: the same course, scaled
        5.0 - course * gains,                  # region 2: the course reversed
        other * gains,                         # region 3: an independent course
        np.full((n_frames, n_channels), 7.0),  # region 4: constant (no correlation defined)
    ], axis=1)                                 # (F, R, C)
    np.testing.assert_allclose(region_embedding(features)[:3, 0],
                               [2 + course.mean(), -1 + 3 * course.mean(), 5 - course.mean()])
    corr = feature_correlation(features)
    np.testing.assert_allclose(corr[0, 1], 1.0, atol=1e-12)
    np.testing.assert_allclose(corr[0, 2], -1.0, atol=1e-12)
    expected = np.mean([np.corrcoef(features[:, 0, c], features[:, 3, c])[0, 1]
                        for c in range(n_channels)])
    np.testing.assert_allclose(corr[0, 3], expected, atol=1e-12)
    np.testing.assert_allclose(corr, corr.T)
    assert np.isnan(corr[4]).all() and np.isnan(corr[:, 4]).all()


def test_feature_correlation_averages_over_the_channels_that_vary() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(50, 3, 2))
    features[:, 0, 1] = 4.0  # region 0 does not vary in channel 1
    corr = feature_correlation(features)
    np.testing.assert_allclose(corr[0, 1], np.corrcoef(features[:, 0, 0], features[:, 1, 0])[0, 1],
                               atol=1e-12)
    np.testing.assert_allclose(corr[1, 2], np.mean([np.corrcoef(features[:, 1, c],
                                                                features[:, 2, c])[0, 1]
                                                    for c in range(2)]), atol=1e-12)


def test_vectorize_is_the_fisher_z_of_the_upper_triangle() -> None:
    matrix = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, np.nan], [-0.2, np.nan, 1.0]])
    np.testing.assert_allclose(vectorize(matrix), [np.arctanh(0.5), np.arctanh(-0.2), np.nan])
    first, second = edge_regions(3)
    assert first.tolist() == [0, 0, 1] and second.tolist() == [1, 2, 2]


def test_connectivity_baseline_matches_nilearn_computed_directly(tmp_path: Path,
                                                                 atlas_dir: Path) -> None:
    atlas = load_atlas(atlas_dir / "AAL3v1_2mm.nii.gz", atlas_dir / "AAL3v1_labels.tsv")
    labels = np.asarray(atlas.image.dataobj)
    mask = labels > 0
    rng = np.random.default_rng(2)
    # Three courses painted into three groups of regions, plus voxel noise.
    courses = rng.normal(size=(3, 30))
    series = np.zeros((*MNI_2MM_SHAPE, 30), dtype=np.float32)
    series[mask] = 100 + courses[labels[mask] % 3] * 5 + rng.normal(size=(mask.sum(), 30))
    for name, data in (("bold.nii", series), ("mask.nii", mask.astype(np.uint8))):
        image = nib.Nifti1Image(data, MNI_2MM_AFFINE)
        image.header.set_xyzt_units("mm", "sec")
        if data.ndim == 4:
            image.header.set_zooms((2.0, 2.0, 2.0, 2.0))
        nib.save(image, tmp_path / name)
    run = prepare_run(tmp_path / "bold.nii", tmp_path / "mask.nii", tmp_path / "cache",
                      PreprocessParams(window_frames=10))
    cube = cube_atlas(atlas)
    timeseries = region_timeseries(run, cube)  # (30, R)
    # nilearn's own region means of the same preprocessed frames, on the cube.
    frames = np.moveaxis(run.frames(0, run.n_frames), 0, -1)
    masker = NiftiLabelsMasker(nib.Nifti1Image(cube.voxel_labels.astype(np.int32) + 1,
                                               cube_affine()),
                               mask_img=nib.Nifti1Image(run.brain.astype(np.uint8), cube_affine()),
                               strategy="mean", standardize=None)
    expected = masker.fit_transform(nib.Nifti1Image(frames, cube_affine()))
    assert expected.shape == timeseries.shape
    np.testing.assert_allclose(timeseries, expected, atol=1e-5)
    corr = correlation_matrix(timeseries)
    direct = ConnectivityMeasure(kind="correlation", cov_estimator=EmpiricalCovariance())
    np.testing.assert_allclose(corr, direct.fit_transform([expected])[0], atol=1e-6)
    np.testing.assert_allclose(corr, np.corrcoef(timeseries.T), atol=1e-6)
    # Regions painted with one course correlate strongly.
    same = [i for i, r in enumerate(atlas.regions) if r.index % 3 == atlas.regions[0].index % 3]
    assert np.nanmean(corr[np.ix_(same, same)]) > 0.9


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_region_timeseries_of_constant_regions_at_downsample_1_and_2(tmp_path: Path,
                                                                     dtype: str) -> None:
    """Regions constant in space give their (z-scored) values at both cache resolutions.

    The regions fill whole 2^3 cells of the cube; the run's brain covers some cells only in part
    (region 1 loses 3 voxels, region 2 keeps 3 of its 8), which the downsampled cache stores as
    ``value * brain voxels / 8``; region 3 lies outside the brain: NaN.
    """
    labels = np.full((96, 96, 96), -1)
    labels[20:30, 20:30, 20:30] = 0
    labels[30:40, 20:30, 20:30] = 1
    labels[50:52, 50:52, 50:52] = 2
    labels[70:72, 70:72, 70:72] = 3
    brain = labels >= 0
    brain[70:72, 70:72, 70:72] = False
    brain[30, 20, 20] = brain[31, 21, 21] = brain[39, 29, 29] = False
    brain[50:52, 50:52, 50:52] = False
    brain[50, 50, 50] = brain[51, 50, 50] = brain[51, 51, 51] = True
    brain[60:66, 60:66, 60:66] = True  # unlabelled brain, in cells of its own
    frames = np.arange(12)
    courses = np.stack([np.sin(frames), np.cos(frames), 0.5 * frames, -frames % 3])  # (4, T)
    rng = np.random.default_rng(0)
    cube = np.zeros((96, 96, 96, 12), dtype=np.float32)
    for region in range(4):
        cube[labels == region] = 100 + 10 * region + courses[region]
    cube[60:66, 60:66, 60:66] = rng.normal(100, 5, size=(6, 6, 6, 12))
    cube[~brain] = 0
    for name, data in (("bold.nii", from_cube(cube, fill=0)),
                       ("mask.nii", from_cube(brain, fill=False).astype(np.uint8))):
        image = nib.Nifti1Image(data, MNI_2MM_AFFINE)
        image.header.set_xyzt_units("mm", "sec")
        if data.ndim == 4:
            image.header.set_zooms((2.0, 2.0, 2.0, 2.0))
        nib.save(image, tmp_path / name)
    atlas = _cube(labels, 4)
    atol = 1e-5 if dtype == "float32" else 4e-3
    for downsample in (1, 2):
        run = prepare_run(tmp_path / "bold.nii", tmp_path / "mask.nii", tmp_path / "cache",
                          PreprocessParams(window_frames=4, dtype=dtype, downsample=downsample))
        stats = run.manifest["normalization"]
        expected = (100 + 10 * np.arange(4)[None] + courses.T - stats["mean"]) / stats["std"]
        timeseries = region_timeseries(run, atlas)  # (12, 4)
        np.testing.assert_allclose(timeseries[:, :3], expected[:, :3], atol=atol, rtol=0)
        assert np.isnan(timeseries[:, 3]).all()


def test_correlation_matrix_leaves_out_regions_without_signal() -> None:
    rng = np.random.default_rng(3)
    timeseries = rng.normal(size=(40, 4))
    timeseries[:, 1] = np.nan
    timeseries[:, 3] = 2.0
    corr = correlation_matrix(timeseries)
    assert np.isnan(corr[1]).all() and np.isnan(corr[:, 3]).all()
    np.testing.assert_allclose(corr[0, 2], np.corrcoef(timeseries[:, 0], timeseries[:, 2])[0, 1])


@pytest.mark.parametrize("backbone", ["swin4d", "vit4d"])
def test_encode_tokens_gives_the_embedding_of_encode(backbone: str) -> None:
    from bidsapp.model.factory import build_model
    from bidsapp.model.presets import BACKBONE_PRESETS

    torch.manual_seed(0)
    model = build_model(BACKBONE_PRESETS[backbone]["tiny"]).eval()
    brain = torch.zeros(1, 96, 96, 96, dtype=torch.bool)
    brain[:, 20:70, 20:80, 20:70] = True
    x = torch.randn(1, 10, 96, 96, 96) * brain[:, None]
    with torch.no_grad():
        embedding, tokens, valid = model.encode_tokens(x, brain)
        torch.testing.assert_close(embedding, model.encode(x, brain))
    steps = 10 // BACKBONE_PRESETS[backbone]["tiny"].tubelet
    assert tokens.shape[:5] == (1, steps, 12, 12, 12)
    assert valid.shape == (1, 12, 12, 12) and valid.any()
    # Tokens outside the brain carry nothing for vit4d (it never encodes them).
    if backbone == "vit4d":
        assert (tokens[0, :, ~valid[0]] == 0).all()


def _two_token_region() -> tuple[CubeAtlas, torch.Tensor]:
    """A cube of 48-voxel tokens (2^3 grid): region 0 fills tokens (0,0,0) and (0,0,1) alike;
    region 1 fills token (1,1,1) and holds one voxel of token (1,1,0); region 2 has no voxel."""
    labels = np.full((96, 96, 96), -1)
    labels[0:48, 0:48, 0:96] = 0
    labels[48:96, 48:96, 48:96] = 1
    labels[50, 50, 10] = 1
    return _cube(labels, 3), torch.ones(2, 2, 2, dtype=torch.bool)


def test_dispersion_weights_favour_the_region_s_own_tokens() -> None:
    labels = np.full((96, 96, 96), -1)
    labels[0:48, 0:48, 0:48] = 0           # token (0,0,0): all of it
    labels[0:48, 0:48, 48:72] = 0          # token (0,0,1): half of it
    cube = _cube(labels, 1)
    # Pooling weights (exponent 0): 2/3 and 1/3; purity cubed: 1 * 1 and 1/2 * 1/8, i.e. 16/17
    # and 1/17 (1.12 effective tokens, so none at the default threshold of 2).
    for exponent, expected in ((0, [2 / 3, 1 / 3]), (3, [16 / 17, 1 / 17])):
        weights = dispersion_weights(cube, 48, exponent=exponent, min_effective_tokens=1)
        assert weights.tokens.tolist() == [0, 1]
        np.testing.assert_allclose(weights.weights.numpy(), expected)
    assert len(dispersion_weights(cube, 48).weights) == 0


def test_within_region_dispersion_sees_a_split_and_not_a_region_mean_change() -> None:
    """Known answer: two tokens of equal weight, ``x_a = c + n_a``, ``x_b = c + n_b``; the
    dispersion is ``log Var((x_a - x_b) / 2)``, whatever happens to the region mean ``c``."""
    cube, valid = _two_token_region()
    weights = dispersion_weights(cube, 48)
    assert sorted(set(weights.regions.tolist())) == [0]  # region 1: one effective token
    rng = np.random.default_rng(0)
    frames, channels = 30, 3
    course, split = rng.standard_normal((2, frames, channels))
    noise = 0.3 * rng.standard_normal((2, frames, channels))

    def dispersion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        tokens = torch.zeros(frames, 2, 2, 2, channels, dtype=torch.float64)
        tokens[:, 0, 0, 0], tokens[:, 0, 0, 1] = torch.from_numpy(a), torch.from_numpy(b)
        tokens[:, 1, 1, 1] = torch.from_numpy(course)  # region 1's token: never counted
        return within_region_dispersion(tokens, valid, weights)  # (R, C)

    base = dispersion(course + noise[0], course + noise[1])
    assert base.shape == (3, channels) and np.isnan(base[1:]).all()
    np.testing.assert_allclose(base[0], np.log(((noise[0] - noise[1]) / 2).var(axis=0)))
    # The region mean changes in amplitude and course, each token gets its own offset: no change.
    louder = 3 * course + rng.standard_normal((frames, 1))
    np.testing.assert_allclose(dispersion(louder + noise[0] + 5, louder + noise[1] - 2), base,
                               atol=1e-12)
    # One half carries +s, the other -s: the region mean is as before, the dispersion is not.
    planted = dispersion(course + noise[0] + split, course + noise[1] - split)
    np.testing.assert_allclose(planted[0], np.log(((noise[0] - noise[1]) / 2 + split).var(axis=0)))
    assert (planted[0] > base[0] + 1).all()


def test_dispersion_sums_over_windows_equal_one_pass_and_follow_valid_tokens() -> None:
    cube, valid = _two_token_region()
    weights = dispersion_weights(cube, 48)
    tokens = torch.from_numpy(np.random.default_rng(1).standard_normal((25, 2, 2, 2, 4)))
    whole = within_region_dispersion(tokens, valid, weights)
    sums = DispersionSums(weights)
    for start in range(0, 25, 10):  # windows of 10, 10 and 5 frames
        sums.add(tokens[start:start + 10], valid)
    np.testing.assert_allclose(sums.result(), whole, rtol=1e-12)
    # Without one of its tokens, region 0 has a single token left: no dispersion.
    partial = valid.clone()
    partial[0, 0, 1] = False
    assert np.isnan(within_region_dispersion(tokens, partial, weights)).all()
    with pytest.raises(ValueError, match="valid tokens changed"):
        sums.add(tokens[:5], partial)


def test_dispersion_covers_the_demo_s_split_regions_at_tiny(atlas_dir: Path) -> None:
    atlas = load_atlas(atlas_dir / "AAL3v1_2mm.nii.gz", atlas_dir / "AAL3v1_labels.tsv")
    weights = dispersion_weights(cube_atlas(atlas), 8)  # tiny: patch 4 x downsample 2
    covered = {atlas.regions[r].name for r in set(weights.regions.tolist())}
    assert len(covered) == 77
    assert set(SPLIT_REGIONS) <= covered
    # Each covered region's weights sum to 1 over at least two effective tokens.
    regions, w = weights.regions.numpy(), weights.weights.numpy()
    np.testing.assert_allclose(np.bincount(regions, w)[sorted(set(regions))], 1)
    assert (1 / np.bincount(regions, w**2)[sorted(set(regions))] >= 2).all()


def test_input_token_signals_average_each_token_s_cells() -> None:
    frames = np.arange(1, 3 * 4 * 4 * 4 + 1, dtype=np.float32).reshape(3, 4, 4, 4)
    frames[:, 0, 2, 3] = frames[:, 3, 1, 0] = 0  # background: stored cells are the others
    support = np.flatnonzero(frames[0].ravel())
    run = SimpleNamespace(shape=(4, 4, 4), n_frames=3, support_index=support,
                          data=frames.reshape(3, -1)[:, support].astype(np.float16))
    signals = input_token_signals(run, 2)  # (3, 2, 2, 2, 1): tokens of 2^3 cells
    assert signals.shape == (3, 2, 2, 2, 1) and signals.dtype == torch.float64
    stored = frames.astype(np.float16).astype(np.float64)  # as the cache holds them
    np.testing.assert_allclose(signals[1, 0, 1, 1, 0], stored[1, 0:2, 2:4, 2:4].mean())
    np.testing.assert_allclose(signals[2, 1, 0, 1, 0], stored[2, 2:4, 0:2, 2:4].mean())
    np.testing.assert_allclose(signals[:, 1, 0, 0, 0], stored[:, 2:4, 0:2, 0:2].mean((1, 2, 3)))
    with pytest.raises(ValueError, match="tile"):
        input_token_signals(run, 3)
