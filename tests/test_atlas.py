"""Tests of bidsapp.atlas on the shared AAL3v1 files and on small atlases written to tmp_path."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsapp.aal_names import group_for_region
from bidsapp.atlas import Atlas, Region, group_summary, load_atlas
from bidsapp.errors import BadDataError, ExitCode, NoInputError

AAL_IMAGE = "AAL3v1_2mm.nii.gz"
AAL_LABELS = "AAL3v1_labels.tsv"


@pytest.fixture(scope="module")
def aal(atlas_dir: Path) -> Atlas:
    return load_atlas(atlas_dir / AAL_IMAGE, atlas_dir / AAL_LABELS)


def _write_atlas(folder: Path, data: np.ndarray, table: str, stem: str = "toy_2mm") -> tuple[
        Path, Path]:
    image, labels = folder / f"{stem}.nii.gz", folder / f"{stem}.tsv"
    nib.save(nib.Nifti1Image(data, np.eye(4)), image)
    labels.write_text(table)
    return image, labels


def _toy_labels() -> np.ndarray:
    data = np.zeros((4, 4, 4), dtype=np.uint8)
    data[0] = 1
    data[1] = 2
    data[3, :2] = 7
    return data


def _refuse_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every HTTP(S) request fail at once (a dead local proxy), whatever the network."""
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)


TOY_TABLE = "index\tname\n1\tPrecentral_L\n2\tVermis_3\n7\tTemporal_Pole_Sup_R\n"


def test_load_from_atlas_dir_environment(atlas_dir: Path) -> None:
    atlas = load_atlas()  # conftest sets ROIMAE_ATLAS_DIR to the shared folder
    assert atlas.name == "AAL3v1"
    assert atlas.source == str(atlas_dir / AAL_IMAGE)
    assert len(atlas.regions) == 166
    assert atlas.image.shape == (91, 109, 91)
    assert np.array_equal(atlas.image.affine, np.diag([-2.0, 2.0, 2.0, 1.0]) + np.array(
        [[0, 0, 0, 90], [0, 0, 0, -126], [0, 0, 0, -72], [0, 0, 0, 0]]))
    assert atlas.regions[0] == Region(1, "Precentral_L", "L", "central")
    assert atlas.regions[-1] == Region(170, "Raphe_M", "n/a", "brainstem")
    assert Region(41, "Hippocampus_L", "L", "limbic") in atlas.regions
    indices = [r.index for r in atlas.regions]
    assert indices == sorted(indices)
    assert 35 not in indices and 81 not in indices  # AAL3 dropped AAL2's labels 35, 36, 81, 82


def test_explicit_paths_equal_environment(aal: Atlas) -> None:
    from_env = load_atlas()
    assert aal.sha256() == from_env.sha256()
    assert aal.regions == from_env.regions
    pd.testing.assert_frame_equal(aal.table(), from_env.table())


def test_table_is_the_shared_dseg_table(aal: Atlas, atlas_dir: Path) -> None:
    shared = pd.read_csv(atlas_dir / AAL_LABELS, sep="\t", keep_default_na=False)
    pd.testing.assert_frame_equal(aal.table(), shared, check_dtype=False)


def test_group_for_region_reproduces_shared_groups(atlas_dir: Path) -> None:
    shared = pd.read_csv(atlas_dir / AAL_LABELS, sep="\t", keep_default_na=False)
    assert len(shared) == 166
    derived = shared["name"].map(group_for_region)
    mismatched = shared.loc[derived != shared["group"], "name"].tolist()
    assert mismatched == []


@pytest.mark.parametrize(("name", "group"), [
    ("Temporal_Pole_Mid_R", "limbic"),
    ("Temporal_Mid_R", "temporal"),
    ("Cingulum_Ant_L", "limbic"),       # AAL1/AAL2 spelling
    ("Thalamus_R", "subcortical"),      # AAL2
    ("Frontal_Sup_Orb_L", "frontal"),   # AAL1
    ("Parietal_Sup_L", "parietal"),
    ("ParaHippocampal_R", "limbic"),
    ("LC_L", "brainstem"),
    ("7Networks_LH_Vis_1", "n/a"),      # not an AAL name
])
def test_group_for_region_examples(name: str, group: str) -> None:
    assert group_for_region(name) == group


def test_resample_to_own_grid_is_exact(aal: Atlas) -> None:
    original = np.asarray(aal.image.dataobj)
    resampled = aal.resample_to(aal.image.shape, aal.image.affine.copy())
    assert resampled.dtype == np.int16
    assert np.array_equal(resampled, original)
    assert len(np.unique(resampled)) - 1 == 166
    resampled[0, 0, 0] = 99  # a copy: the atlas is untouched
    assert np.asarray(aal.image.dataobj)[0, 0, 0] == 0


def test_resample_to_3mm_grid(aal: Atlas) -> None:
    affine = np.array([[-3.0, 0, 0, 90], [0, 3, 0, -126], [0, 0, 3, -72], [0, 0, 0, 1]])
    resampled = aal.resample_to((61, 73, 61), affine)
    assert resampled.shape == (61, 73, 61)
    assert resampled.dtype == np.int16
    original = np.asarray(aal.image.dataobj)
    # Every second 3 mm voxel centre (6 mm apart) is every third 2 mm voxel centre: known answer.
    assert np.array_equal(resampled[::2, ::2, ::2], original[::3, ::3, ::3])
    values = set(np.unique(resampled).tolist())
    assert values <= {0} | {r.index for r in aal.regions}
    lost = sorted({r.name for r in aal.regions} - {r.name for r in aal.regions
                                                   if r.index in values})
    print(f"regions lost at 3 mm: {lost}")
    assert len(lost) <= 4  # tiny nuclei (Thal_Re_R, VTA_R: a few 2 mm voxels each)


def test_contiguous_maps_labels_to_positions(aal: Atlas) -> None:
    # AAL3v1 skips 35, 36, 81, 82: labels 1..34 are ids 0..33, 37 -> 34, ..., 41 -> 38, 170 -> 165.
    labels = np.array([[0, 1, 34], [37, 41, 170]], dtype=np.uint8)
    expected = np.array([[-1, 0, 33], [34, 38, 165]], dtype=np.int16)
    ids = aal.contiguous(labels)
    assert ids.dtype == np.int16
    assert np.array_equal(ids, expected)
    assert aal.regions[38].name == "Hippocampus_L"
    with pytest.raises(ValueError, match="35"):
        aal.contiguous(np.array([1, 35]))
    with pytest.raises(ValueError, match="171"):
        aal.contiguous(np.array([171]))


def test_contiguous_on_resampled_grid_covers_all_regions(aal: Atlas) -> None:
    ids = aal.contiguous(aal.resample_to(aal.image.shape, aal.image.affine))
    assert ids.min() == -1
    assert np.array_equal(np.unique(ids[ids >= 0]), np.arange(166))


def test_sha256_changes_with_table(tmp_path: Path) -> None:
    image, labels = _write_atlas(tmp_path, _toy_labels(), TOY_TABLE)
    first = load_atlas(image, labels).sha256()
    assert load_atlas(image, labels).sha256() == first
    labels.write_text(TOY_TABLE.replace("Vermis_3", "Vermis_4_5"))
    assert load_atlas(image, labels).sha256() != first
    assert len(first) == 64


def test_missing_columns_are_derived(tmp_path: Path) -> None:
    atlas = load_atlas(*_write_atlas(tmp_path, _toy_labels(), TOY_TABLE))
    assert atlas.name == "toy"
    assert atlas.regions == (
        Region(1, "Precentral_L", "L", "central"),
        Region(2, "Vermis_3", "n/a", "cerebellum"),
        Region(7, "Temporal_Pole_Sup_R", "R", "limbic"),
    )
    assert list(atlas.table().columns) == ["index", "name", "hemisphere", "group"]
    assert np.array_equal(atlas.contiguous(np.array([0, 1, 2, 7])), [-1, 0, 1, 2])


def test_table_label_without_voxels_is_kept(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    table = TOY_TABLE + "9\tAmygdala_L\n"
    with caplog.at_level(logging.DEBUG, logger="roimae"):
        atlas = load_atlas(*_write_atlas(tmp_path, _toy_labels(), table))
    assert [r.index for r in atlas.regions] == [1, 2, 7, 9]
    assert "[9]" in caplog.text


def test_float_image_with_integer_values_is_accepted(tmp_path: Path) -> None:
    atlas = load_atlas(*_write_atlas(tmp_path, _toy_labels().astype(np.float32), TOY_TABLE))
    assert np.asarray(atlas.image.dataobj).dtype == np.int16
    assert len(atlas.regions) == 3


def test_image_label_missing_from_table(tmp_path: Path) -> None:
    table = "index\tname\n1\tPrecentral_L\n2\tVermis_3\n"
    with pytest.raises(BadDataError, match=r"\[7\]") as excinfo:
        load_atlas(*_write_atlas(tmp_path, _toy_labels(), table))
    assert excinfo.value.exit_code == ExitCode.BAD_DATA == 65


@pytest.mark.parametrize(("table", "match"), [
    (TOY_TABLE + "7\tAmygdala_L\n", "duplicate index"),
    (TOY_TABLE + "9\tVermis_3\n", "duplicate name"),
    ("label\tname\n1\tPrecentral_L\n", "index"),
    ("index\tname\none\tPrecentral_L\n", "integers"),
    ("", "cannot read"),
])
def test_bad_tables(tmp_path: Path, table: str, match: str) -> None:
    with pytest.raises(BadDataError, match=match):
        load_atlas(*_write_atlas(tmp_path, _toy_labels(), table))


@pytest.mark.parametrize(("data", "match"), [
    (np.full((2, 2, 2), 1.5, dtype=np.float32), "integer"),
    (np.ones((2, 2, 2, 2), dtype=np.uint8), "3D"),
    (-np.ones((2, 2, 2), dtype=np.int16), "0..32767"),
])
def test_bad_images(tmp_path: Path, data: np.ndarray, match: str) -> None:
    with pytest.raises(BadDataError, match=match):
        load_atlas(*_write_atlas(tmp_path, data, TOY_TABLE))


def test_unreadable_image(tmp_path: Path) -> None:
    image, labels = _write_atlas(tmp_path, _toy_labels(), TOY_TABLE)
    image.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(BadDataError, match="cannot read"):
        load_atlas(image, labels)


def test_missing_files(tmp_path: Path, atlas_dir: Path) -> None:
    with pytest.raises(NoInputError, match="does not exist") as excinfo:
        load_atlas(tmp_path / "absent.nii.gz", atlas_dir / AAL_LABELS)
    assert excinfo.value.exit_code == 66
    with pytest.raises(NoInputError, match="does not exist"):
        load_atlas(atlas_dir / AAL_IMAGE, tmp_path / "absent.tsv")
    with pytest.raises(NoInputError, match="both"):
        load_atlas(atlas_dir / AAL_IMAGE, None)


def test_atlas_dir_with_one_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_atlas(tmp_path, _toy_labels(), TOY_TABLE, stem="my-atlas")
    monkeypatch.setenv("ROIMAE_ATLAS_DIR", str(tmp_path))
    atlas = load_atlas()
    assert atlas.name == "myatlas"  # alphanumeric, usable as a BIDS atlas- label
    assert len(atlas.regions) == 3
    _write_atlas(tmp_path, _toy_labels(), TOY_TABLE, stem="other")
    with pytest.raises(NoInputError, match="exactly one image"):
        load_atlas()
    monkeypatch.setenv("ROIMAE_ATLAS_DIR", str(tmp_path / "absent"))
    with pytest.raises(NoInputError, match="not a directory"):
        load_atlas()


def test_nilearn_fetch_offline_fails_with_instructions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROIMAE_ATLAS_DIR")
    monkeypatch.setenv("ROIMAE_DATA_DIR", str(tmp_path / "data"))
    # No cached copy anywhere nilearn looks, and every download refused.
    for variable in ("NILEARN_DATA", "NILEARN_SHARED_DATA", "HOME"):
        monkeypatch.setenv(variable, str(tmp_path / "empty"))
    _refuse_downloads(monkeypatch)
    with pytest.raises(NoInputError) as excinfo:
        load_atlas()
    message = str(excinfo.value)
    assert "\n" not in message
    assert "--atlas" in message and "--atlas-labels" in message and "ROIMAE_ATLAS_DIR" in message
    assert excinfo.value.exit_code == 66


def test_nilearn_cached_copy_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       aal: Atlas) -> None:
    # nilearn's AAL3v2 cache layout (<data_dir>/aal_3v2/AAL3/AAL3v1.{nii,xml}), filled from the
    # shared 2 mm files: nilearn then reads it without downloading and parses the XML itself.
    cache = tmp_path / "data" / "aal_3v2" / "AAL3"
    cache.mkdir(parents=True)
    nib.save(aal.image, cache / "AAL3v1.nii")
    labels = "".join(f"<label><index>{r.index}</index><name>{r.name}</name></label>"
                     for r in aal.regions)
    (cache / "AAL3v1.xml").write_text(
        f'<?xml version="1.0"?>\n<atlas version="2.0"><data>{labels}</data></atlas>\n')
    monkeypatch.delenv("ROIMAE_ATLAS_DIR")
    monkeypatch.setenv("ROIMAE_DATA_DIR", str(tmp_path / "data"))
    _refuse_downloads(monkeypatch)
    atlas = load_atlas()
    assert atlas.name == "AAL3v2"
    assert atlas.source == "nilearn:aal 3v2"
    # No hemisphere/group in the XML: derived, they equal the shared table, so does the hash.
    assert atlas.regions == aal.regions
    assert atlas.sha256() == aal.sha256()


def test_group_summary_weighs_regions_by_their_voxels() -> None:
    table = pd.DataFrame({
        "group": ["a", "a", "a", "b", "b"],
        "voxels": [90, 10, 50, 1, 3],
        "reconerror": [1.0, 11.0, np.nan, 2.0, 6.0],
        "occlusion": [0.5, 0.5, 2.0, np.nan, np.nan],
    })
    summary = group_summary(table, ("reconerror", "occlusion")).set_index("group")
    assert summary["regions"].tolist() == [3, 2]
    assert summary["regions_with_values"].tolist() == [2, 2]
    # (90 * 1 + 10 * 11) / 100 = 2: the 10-voxel region's outlier counts a tenth.
    np.testing.assert_allclose(summary["reconerror"], [2.0, (2.0 + 18.0) / 4])
    np.testing.assert_allclose(summary.loc["a", "occlusion"], (45 + 5 + 100) / 150)
    assert np.isnan(summary.loc["b", "occlusion"])
    # Without voxel counts every region weighs one.
    plain = group_summary(table.drop(columns="voxels"), ("reconerror",)).set_index("group")
    np.testing.assert_allclose(plain["reconerror"], [6.0, 4.0])
