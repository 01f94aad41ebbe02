"""BOLD runs to the memory-mapped cache (bidsapp.preprocess), on small synthetic NIfTI files."""

from __future__ import annotations

import logging
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nibabel.affines import apply_affine
from nibabel.processing import resample_from_to

from bidsapp.cache import CachedRun, PreprocessParams, load_cached
from bidsapp.errors import BadDataError
from bidsapp.grid import CUBE_SHAPE, MNI_2MM_AFFINE, MNI_2MM_SHAPE, cube_affine
from bidsapp.logs import get_logger
from bidsapp.model.factory import build_model
from bidsapp.model.presets import PRESETS
from bidsapp.preprocess import VoxelSampler, prepare_run
from bidsapp.windows import WindowDataset, collate_windows

PARAMS = PreprocessParams(window_frames=4)
#: float16 keeps 11 significant bits: |z| < 6 is stored to within 3e-3.
F16_ATOL = 4e-3


@pytest.fixture(scope="module")
def brain_mask(atlas_dir: Path) -> np.ndarray:
    """AAL3 voxels, plus a patch in the y rows that the cube crops: (91, 109, 91) bool."""
    mask = np.asarray(nib.load(atlas_dir / "AAL3v1_2mm.nii.gz").dataobj) > 0
    mask[40:50, 2, 30:40] = True
    return mask


def save(path: Path, data: np.ndarray, affine: np.ndarray, tr: float | None = 2.0,
         unit: str = "sec") -> Path:
    image = nib.Nifti1Image(data, affine)
    if tr is not None:
        image.header.set_zooms((*image.header.get_zooms()[:3], tr))
        image.header.set_xyzt_units("mm", unit)
    nib.save(image, path)
    return path


def noise(n_frames: int, seed: int = 0) -> np.ndarray:
    """(91, 109, 91, T) float32 around 100, as a BOLD series."""
    rng = np.random.default_rng(seed)
    return rng.normal(100, 10, size=(*MNI_2MM_SHAPE, n_frames)).astype(np.float32)


def write_run(folder: Path, series: np.ndarray, mask: np.ndarray,
              affine: np.ndarray = MNI_2MM_AFFINE, suffix: str = ".nii",
              **header) -> tuple[Path, Path]:
    bold = save(folder / f"bold{suffix}", series, affine, **header)
    mask_path = save(folder / f"mask{suffix}", mask.astype(np.uint8), affine, tr=None)
    return bold, mask_path


def z_scored_cubes(series: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Hand computation: crop/pad by the formula, z-score over brain voxels, background 0.

    Returns (T, 96, 96, 96) float64.
    """
    cube = np.zeros((*CUBE_SHAPE, series.shape[-1]))
    brain = np.zeros(CUBE_SHAPE, dtype=bool)
    cube[3:94, :, 3:94] = series[:, 6:102]  # cube (i, j, k) = MNI (i - 3, j + 6, k - 3)
    brain[3:94, :, 3:94] = mask[:, 6:102]
    values = cube[brain]
    z = np.where(brain[..., None], (cube - values.mean()) / values.std(), 0.0)
    return np.moveaxis(z, -1, 0)


def test_prepared_run_is_z_scored_cube_of_the_input(tmp_path: Path,
                                                    brain_mask: np.ndarray) -> None:
    series = noise(10)
    bold, mask = write_run(tmp_path, series, brain_mask)
    run = prepare_run(bold, mask, tmp_path / "cache", PARAMS)

    assert run.n_frames == 10 and run.n_windows == 2 and run.repetition_time == 2.0
    assert isinstance(run.data, np.memmap) and run.data.dtype == np.float16
    # The patch in the cropped y rows is dropped, every other mask voxel kept.
    assert run.brain.shape == CUBE_SHAPE and run.brain.sum() == brain_mask[:, 6:102].sum()
    assert run.data.shape == (10, run.brain.sum())
    values = run.data.astype(np.float64)
    assert abs(values.mean()) < 1e-3 and abs(values.std() - 1) < 1e-3

    expected = z_scored_cubes(series, brain_mask)
    window = run.window(1)
    assert window.shape == (4, *CUBE_SHAPE) and window.dtype == np.float32
    np.testing.assert_allclose(window, expected[4:8], atol=F16_ATOL)
    assert (window[:, ~run.brain] == 0).all()
    np.testing.assert_allclose(run.frames(8, 10), expected[8:], atol=F16_ATOL)
    with pytest.raises(IndexError):
        run.window(2)  # frames 8 and 9 fill no window

    manifest = run.manifest
    assert manifest["source"] == str(bold.absolute()) and len(manifest["source_sha256"]) == 64
    assert manifest["params"] == {"window_frames": 4, "target_tr": None, "dtype": "float16",
                                  "downsample": 1}
    kept = brain_mask.copy()
    kept[:, :6] = kept[:, 102:] = False
    assert manifest["normalization"]["mean"] == pytest.approx(series[kept].mean(), rel=1e-6)


def test_cache_is_reused_and_keyed_by_content_and_params(tmp_path: Path,
                                                         brain_mask: np.ndarray,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    bold, mask = write_run(tmp_path, noise(8), brain_mask)
    cache = tmp_path / "cache"
    first = prepare_run(bold, mask, cache, PARAMS)
    data_file = (first.directory / "data.npy").stat()

    logger = get_logger("preprocess")
    logger.addHandler(caplog.handler)
    # Only the second call's records: pytest also attaches caplog's handler to non-propagating
    # loggers, such as "roimae" once an earlier in-process run set it up, so the first call's
    # records can be there too.
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            again = prepare_run(bold, mask, cache, PARAMS)
    finally:
        logger.removeHandler(caplog.handler)
    messages = [record.getMessage() for record in caplog.records]
    assert any("reusing cache" in m for m in messages)
    assert not any("preparing" in m for m in messages)  # the NIfTI was not read again
    assert again.directory == first.directory
    assert (again.directory / "data.npy").stat().st_mtime_ns == data_file.st_mtime_ns

    # The same content under another name is the same entry; other params are another one.
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    (copy_dir / "bold.nii").write_bytes(bold.read_bytes())
    assert prepare_run(copy_dir / "bold.nii", mask, cache, PARAMS).directory == first.directory
    other = prepare_run(bold, mask, cache, PreprocessParams(window_frames=2))
    assert other.directory != first.directory and other.n_windows == 4
    with_tr = prepare_run(bold, mask, cache, PARAMS, repetition_time=1.5)
    assert with_tr.directory != first.directory and with_tr.repetition_time == 1.5
    pooled = prepare_run(bold, mask, cache, PreprocessParams(window_frames=4, downsample=2))
    assert pooled.directory != first.directory and pooled.shape == (48, 48, 48)
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(
        {first.directory.name, other.directory.name, with_tr.directory.name,
         pooled.directory.name})


def test_killed_build_is_redone(tmp_path: Path, brain_mask: np.ndarray) -> None:
    bold, mask = write_run(tmp_path, noise(8), brain_mask)
    cache = tmp_path / "cache"
    entry = prepare_run(bold, mask, cache, PARAMS).directory
    expected = np.array(load_cached(entry).data)
    # What a SIGKILL mid-build leaves: no entry, a half-written temporary directory.
    (entry / "manifest.json").unlink()
    entry.rename(cache / f".{entry.name}.0badc0de.tmp")
    rebuilt = prepare_run(bold, mask, cache, PARAMS)
    assert rebuilt.directory == entry
    np.testing.assert_array_equal(rebuilt.data, expected)
    assert not list(cache.glob("*.tmp"))


def test_concurrent_preparation_builds_once(tmp_path: Path, brain_mask: np.ndarray) -> None:
    bold, mask = write_run(tmp_path, noise(8), brain_mask)
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: prepare_run(bold, mask, tmp_path / "cache", PARAMS),
                             range(2)))
    assert runs[0].directory == runs[1].directory
    assert runs[0].manifest["created"] == runs[1].manifest["created"]


def test_downsampled_entry_is_the_pooled_cube(tmp_path: Path, brain_mask: np.ndarray) -> None:
    """At downsample 2 an entry holds what the model's prepare computes from the full-res one."""
    bold, mask = write_run(tmp_path, noise(9), brain_mask)
    full = prepare_run(bold, mask, tmp_path / "cache", PARAMS)
    run = prepare_run(bold, mask, tmp_path / "cache", PreprocessParams(window_frames=4,
                                                                       downsample=2))
    assert run.downsample == 2 and run.shape == (48, 48, 48) and run.n_windows == 2
    model = build_model(PRESETS["tiny"])
    cubes = torch.from_numpy(full.frames(0, 9))[None]  # (1, 9, 96, 96, 96), stored float16
    x, brain = model.prepare(cubes, torch.from_numpy(full.brain)[None])
    # Pooled from float16 values in float32 (the old path) vs pooled in float32, then float16.
    np.testing.assert_allclose(run.frames(0, 9), x[0].numpy(), atol=F16_ATOL, rtol=0)
    expected = F.avg_pool3d(torch.from_numpy(z_scored_cubes(noise(9), brain_mask)), 2).numpy()
    np.testing.assert_allclose(run.frames(0, 9), expected, atol=F16_ATOL / 2, rtol=0)
    np.testing.assert_array_equal(run.brain, brain[0].numpy())
    # The columns are the cells with any brain voxel; their voxel counts are stored.
    voxels = full.brain.reshape(48, 2, 48, 2, 48, 2).sum(axis=(1, 3, 5))
    np.testing.assert_array_equal(run.cell_voxels(), voxels)
    np.testing.assert_array_equal(run.support_index, np.flatnonzero(voxels))
    assert run.data.shape == (9, (voxels > 0).sum()) and run.brain.sum() < (voxels > 0).sum()
    assert (run.frames(0, 9)[:, voxels == 0] == 0).all()
    # Batches are at the stored resolution, and the model takes them as they are.
    batch = collate_windows([WindowDataset([run])[1]])
    assert batch["x"].shape == (1, 4, 48, 48, 48) and batch["brain"].shape == (1, 48, 48, 48)
    np.testing.assert_array_equal(batch["x"][0].numpy(), run.window(1))
    np.testing.assert_array_equal(batch["brain"][0].numpy(), run.brain)
    same_x, same_brain = model.prepare(batch["x"], batch["brain"])
    assert same_x is batch["x"] and torch.equal(same_brain, batch["brain"])
    clone = pickle.loads(pickle.dumps(run))
    np.testing.assert_array_equal(clone.window(1), run.window(1))
    with pytest.raises(ValueError, match="different resolutions"):
        collate_windows([WindowDataset([run])[0], WindowDataset([full])[0]])


def test_downsample_is_checked() -> None:
    with pytest.raises(ValueError, match="downsample"):
        PreprocessParams(downsample=5)
    with pytest.raises(ValueError, match="downsample"):
        PreprocessParams(downsample=0)
    assert PreprocessParams(downsample=3).working_shape == (32, 32, 32)


def test_window_dataset(tmp_path: Path, brain_mask: np.ndarray) -> None:
    bold, mask = write_run(tmp_path, noise(9), brain_mask)
    run = prepare_run(bold, mask, tmp_path / "cache", PARAMS)
    dataset = WindowDataset([run, run])
    assert len(dataset) == 4
    item = dataset[3]
    assert item["values"].shape == (4, int(run.brain.sum())) and (item["run"], item["window"]) == (1, 1)
    assert item["brain"].shape == CUBE_SHAPE and len(item["support_index"]) == run.brain.sum()
    batch = collate_windows([dataset[3], dataset[0]])
    assert batch["x"].shape == (2, 4, *CUBE_SHAPE) and batch["x"].dtype == torch.float32
    assert batch["brain"].shape == (2, *CUBE_SHAPE) and batch["brain"].dtype == torch.bool
    assert batch["run"].tolist() == [1, 0] and batch["window"].tolist() == [1, 0]
    np.testing.assert_array_equal(batch["x"][0].numpy(), run.window(1))
    np.testing.assert_array_equal(batch["x"][1].numpy(), run.window(0))
    np.testing.assert_array_equal(batch["brain"][0].numpy(), run.brain)
    subset = WindowDataset([run], window_indices=[(0, 1)])
    assert len(subset) == 1 and subset[0]["window"] == 1
    with pytest.raises(IndexError):
        WindowDataset([run], window_indices=[(0, 2)])[0]
    # A DataLoader with worker processes batches the same way.
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_windows,
                                         num_workers=1)
    np.testing.assert_array_equal(next(iter(loader))["x"][1].numpy(), run.window(1))
    # Pickling (spawned DataLoader workers) reopens the entry memory-mapped.
    clone = pickle.loads(pickle.dumps(run))
    assert isinstance(clone, CachedRun) and isinstance(clone.data, np.memmap)
    np.testing.assert_array_equal(clone.window(0), run.window(0))


def test_fmriprep_res2_grid_gives_the_same_cube(tmp_path: Path, brain_mask: np.ndarray) -> None:
    # fMRIPrep's MNI152NLin2009cAsym res-2 grid: 97 x 115 x 97, RAS, origin (-96, -132, -78) mm.
    # Its voxel centres coincide with the MNI 2 mm grid's: MNI (i, j, k) = fMRIPrep
    # (93 - i, j + 3, k + 3), so resampling must reproduce the data on the MNI grid.
    affine = np.diag([2.0, 2, 2, 1])
    affine[:3, 3] = (-96, -132, -78)
    series = noise(6, seed=4)
    big_series = np.zeros((97, 115, 97, 6), dtype=np.float32)
    big_mask = np.zeros((97, 115, 97), dtype=bool)
    big_series[93:2:-1, 3:112, 3:94] = series
    big_mask[93:2:-1, 3:112, 3:94] = brain_mask
    np.testing.assert_allclose(apply_affine(affine, [93 - 10, 20 + 3, 30 + 3]),
                               apply_affine(MNI_2MM_AFFINE, [10, 20, 30]))
    (tmp_path / "fmriprep").mkdir()
    bold, mask = write_run(tmp_path / "fmriprep", big_series, big_mask, affine)
    run = prepare_run(bold, mask, tmp_path / "cache", PARAMS)
    assert run.manifest["spatially_resampled"]
    np.testing.assert_array_equal(run.brain[3:94, :, 3:94], brain_mask[:, 6:102])
    expected = z_scored_cubes(series, brain_mask)
    np.testing.assert_allclose(run.frames(0, 6), expected, atol=F16_ATOL)
    # Shared voxel centres are copied; a 0.01 mm shift goes through trilinear interpolation
    # and must agree.
    affine[:3, 3] += 0.01
    (tmp_path / "shifted").mkdir()
    bold, mask = write_run(tmp_path / "shifted", big_series, big_mask, affine)
    interpolated = prepare_run(bold, mask, tmp_path / "cache", PARAMS)
    np.testing.assert_array_equal(interpolated.brain, run.brain)
    np.testing.assert_allclose(interpolated.frames(0, 6), expected, atol=0.05)


def test_half_voxel_shift_averages_the_eight_neighbours() -> None:
    # A source grid shifted by half a voxel (1 mm) along every axis: each MNI voxel centre lies
    # at the centre of a cube of 8 source voxels, so trilinear weights are all 1/8.
    affine = MNI_2MM_AFFINE.copy()
    affine[:3, 3] += (-1, 1, 1)  # source voxel (i, j, k) sits at MNI voxel (i, j, k) + 1/2
    shape = (8, 9, 10)
    rng = np.random.default_rng(3)
    volumes = rng.normal(size=(*shape, 2)).astype(np.float32)
    kept = np.zeros(MNI_2MM_SHAPE, dtype=bool)
    kept[[1, 4, 6], [2, 5, 7], [3, 1, 8]] = True
    sampler = VoxelSampler.between(kept, affine, shape)
    assert sampler.indices.shape == (8, 3)
    flat = volumes.reshape(-1, 2, order="F").T  # (t, n_source), F order as NIfTI stores it
    expected = [volumes[i - 1:i + 1, j - 1:j + 1, k - 1:k + 1].mean(axis=(0, 1, 2))
                for i, j, k in np.argwhere(kept)]
    np.testing.assert_allclose(sampler(flat), np.array(expected).T, rtol=1e-5)
    # A voxel centre at the grid's edge takes 0 for the neighbours outside it.
    kept[:] = False
    kept[0, 0, 0] = True
    edge = VoxelSampler.between(kept, affine, shape)
    np.testing.assert_allclose(edge(flat)[:, 0], volumes[0, 0, 0] / 8, rtol=1e-5)


def test_3mm_grid_is_resampled_to_2mm(tmp_path: Path, brain_mask: np.ndarray) -> None:
    # A 3 mm MNI grid (RAS, origin (-90, -126, -72)) holding a signal linear in x (mm) times
    # the frame number: trilinear interpolation reproduces it, so the known answer is x * (t + 1).
    affine = np.diag([3.0, 3, 3, 1])
    affine[:3, 3] = (-90, -126, -72)
    shape = (61, 73, 61)
    x_mm = apply_affine(affine, np.stack(np.indices(shape), axis=-1))[..., 0]
    series = (x_mm[..., None] * np.arange(1, 5)).astype(np.float32)  # (61, 73, 61, 4)
    mask_3mm = np.asarray(resample_from_to(
        nib.Nifti1Image(brain_mask.astype(np.uint8), MNI_2MM_AFFINE), (shape, affine),
        order=0).dataobj) > 0
    bold, mask = write_run(tmp_path, series, mask_3mm, affine)
    run = prepare_run(bold, mask, tmp_path / "cache", PARAMS)

    assert run.manifest["spatially_resampled"] and run.n_frames == 4
    # Nearest-neighbour resampling keeps the mask volume: 27 mm^3 -> 8 mm^3 voxels.
    assert run.brain.sum() * 8 == pytest.approx(mask_3mm.sum() * 27, rel=0.05)
    brain_x = apply_affine(cube_affine(), np.argwhere(run.brain))[:, 0]
    signal = brain_x[None, :] * np.arange(1, 5)[:, None]  # (T, n_brain)
    expected = (signal - signal.mean()) / signal.std()
    np.testing.assert_allclose(run.frames(0, 4)[:, run.brain], expected, atol=5e-3)


def test_temporal_resampling_halves_the_frames(tmp_path: Path, brain_mask: np.ndarray) -> None:
    series = noise(8, seed=5)
    bold, mask = write_run(tmp_path, series, brain_mask, tr=1.0)
    run = prepare_run(bold, mask, tmp_path / "cache",
                      PreprocessParams(window_frames=2, target_tr=2.0))
    assert run.n_frames == 4 and run.repetition_time == 2.0 and run.n_windows == 2
    # Output frame k is centred at 2k + 1 s, between input frames 2k and 2k + 1 (centres
    # 2k + 0.5 and 2k + 1.5 s): their mean.
    pairs = (series[..., 0::2] + series[..., 1::2]) / 2
    np.testing.assert_allclose(run.frames(0, 4), z_scored_cubes(pairs, brain_mask),
                               atol=F16_ATOL)


def test_temporal_resampling_doubles_the_frames(tmp_path: Path, brain_mask: np.ndarray) -> None:
    series = noise(4, seed=6)
    # TR 2000 ms in the header: the time unit is honoured.
    bold, mask = write_run(tmp_path, series, brain_mask, tr=2000.0, unit="msec")
    run = prepare_run(bold, mask, tmp_path / "cache",
                      PreprocessParams(window_frames=4, target_tr=1.0))
    assert run.n_frames == 8 and run.manifest["source_repetition_time"] == 2.0
    # Inputs are centred at 1, 3, 5, 7 s, outputs at 0.5, 1.5, ..., 7.5 s: the first and last
    # outputs hold the edge frames, the others weigh their neighbours 3:1 and 1:3.
    a = [series[..., t] for t in range(4)]
    doubled = np.stack([a[0], 0.75 * a[0] + 0.25 * a[1], 0.25 * a[0] + 0.75 * a[1],
                        0.75 * a[1] + 0.25 * a[2], 0.25 * a[1] + 0.75 * a[2],
                        0.75 * a[2] + 0.25 * a[3], 0.25 * a[2] + 0.75 * a[3], a[3]], axis=-1)
    np.testing.assert_allclose(run.frames(0, 8), z_scored_cubes(doubled, brain_mask),
                               atol=F16_ATOL)


def test_nan_outside_the_mask_is_ignored(tmp_path: Path, brain_mask: np.ndarray) -> None:
    series = noise(4)
    series[0, 0, 0, :] = np.nan
    # Compressed: nibabel hands out read-only arrays, which must not be written to.
    bold, mask = write_run(tmp_path, series, brain_mask, suffix=".nii.gz")
    run = prepare_run(bold, mask, tmp_path / "cache", PARAMS)
    assert np.isfinite(run.data).all()


def _refused(bold: Path, mask: Path, tmp_path: Path, match: str,
             params: PreprocessParams = PARAMS) -> None:
    with pytest.raises(BadDataError, match=match) as error:
        prepare_run(bold, mask, tmp_path / "cache", params)
    assert error.value.exit_code == 65
    assert "\n" not in str(error.value)
    # A refused run leaves no entry and no temporary directory behind.
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_3d_image_is_refused(tmp_path: Path, brain_mask: np.ndarray) -> None:
    bold, mask = write_run(tmp_path, noise(1)[..., 0], brain_mask, tr=None)
    _refused(bold, mask, tmp_path, "expected a 4D BOLD series")


def test_nan_inside_the_mask_is_refused(tmp_path: Path, brain_mask: np.ndarray) -> None:
    series = noise(5)
    x, y, z = np.argwhere(brain_mask[:, 6:102])[:3].T
    series[x, y + 6, z, 2] = np.nan  # three voxels, one of them twice
    series[x[0], y[0] + 6, z[0], 4] = np.inf
    bold, mask = write_run(tmp_path, series, brain_mask)
    _refused(bold, mask, tmp_path, r"bold\.nii: 3 voxels inside the brain mask hold NaN")


def test_too_few_frames_are_refused(tmp_path: Path, brain_mask: np.ndarray) -> None:
    bold, mask = write_run(tmp_path, noise(3), brain_mask)
    _refused(bold, mask, tmp_path, "3 frames, fewer than one window of 4")
    # Resampling in time counts: 4 frames at TR 2 s are 2 frames at 4 s.
    _refused(bold, mask, tmp_path, "fewer than one window",
             PreprocessParams(window_frames=3, target_tr=4.0))


def test_constant_signal_is_refused(tmp_path: Path, brain_mask: np.ndarray) -> None:
    bold, mask = write_run(tmp_path, np.full((*MNI_2MM_SHAPE, 4), 7, np.float32), brain_mask)
    _refused(bold, mask, tmp_path, "constant inside the brain mask")


def test_unknown_tr_is_refused_when_resampling_in_time(tmp_path: Path,
                                                       brain_mask: np.ndarray) -> None:
    bold, mask = write_run(tmp_path, noise(4), brain_mask, tr=0.0)  # pixdim[4] = 0: no TR
    _refused(bold, mask, tmp_path, "repetition time is unknown",
             PreprocessParams(window_frames=2, target_tr=1.0))


def test_mask_on_another_grid_is_refused(tmp_path: Path, brain_mask: np.ndarray) -> None:
    bold, _ = write_run(tmp_path, noise(4), brain_mask)
    shifted = MNI_2MM_AFFINE.copy()
    shifted[0, 3] += 2
    mask = save(tmp_path / "shifted_mask.nii", brain_mask.astype(np.uint8), shifted, tr=None)
    _refused(bold, mask, tmp_path, "is not on the grid of")
    cropped = save(tmp_path / "small_mask.nii", brain_mask[:90].astype(np.uint8),
                   MNI_2MM_AFFINE, tr=None)
    _refused(bold, cropped, tmp_path, "is not on the grid of")


def test_empty_mask_is_refused(tmp_path: Path, brain_mask: np.ndarray) -> None:
    bold, mask = write_run(tmp_path, noise(4), np.zeros_like(brain_mask))
    _refused(bold, mask, tmp_path, "is empty")


def test_truncated_gzip_is_refused(tmp_path: Path, brain_mask: np.ndarray) -> None:
    bold, mask = write_run(tmp_path, noise(4), brain_mask, suffix=".nii.gz")
    content = bold.read_bytes()
    bold.write_bytes(content[: len(content) // 2])
    _refused(bold, mask, tmp_path, r"cannot read .*bold\.nii\.gz")


def test_zero_byte_files_are_refused(tmp_path: Path, brain_mask: np.ndarray) -> None:
    bold, mask = write_run(tmp_path, noise(4), brain_mask, suffix=".nii.gz")
    empty = tmp_path / "empty_bold.nii.gz"
    empty.touch()
    _refused(empty, mask, tmp_path, r"cannot read .*empty_bold\.nii\.gz")
    mask.write_bytes(b"")
    _refused(bold, mask, tmp_path, r"cannot read .*mask\.nii\.gz")


@pytest.mark.parametrize("shift_mm", [
    (300, 300, 300),  # voxel centres shared with the MNI grid, which holds none of the data
    (301, 301, 301),  # the field of view does not overlap the MNI grid at all
    (0, 31, 71),  # it overlaps, but most of the brain falls outside the MNI brain
])
def test_affine_outside_mni_is_refused(tmp_path: Path, brain_mask: np.ndarray,
                                       shift_mm: tuple[int, int, int]) -> None:
    far = MNI_2MM_AFFINE.copy()
    far[:3, 3] += shift_mm
    bold, mask = write_run(tmp_path, noise(4), brain_mask, far)
    _refused(bold, mask, tmp_path, r"bold\.nii is not in MNI space")
