"""Any atlas: another parcellation runs pretrain, participant and group, and names the outputs.

AAL116 (read from ``../shared/realdata/development_fmri``, its region list converted to a label
table here) runs the whole chain; a Schaefer-like parcellation made here (k-means clusters of
the brain, named by hemisphere, no region groups) runs it too, without summaries by group.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans

from bidsapp.atlas import load_atlas
from bidsapp.cli import main
from bidsapp.demo import make_demo_dataset

PREFIX = "sub-01_task-rest_space-MNI152NLin6Asym"
COMMON = ["--nprocs", "1", "--omp-nthreads", "1"]
#: Pretraining on 4 of the 12 participants keeps the test short.
PRETRAIN = ["--epochs", "1", "--window-frames", "10", "--participant-label", "01", "02", "03", "04"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 participants (the group level's nested cross-validation needs them), one window each."""
    bids = tmp_path_factory.mktemp("any-atlas") / "bids"
    make_demo_dataset(bids, n_participants=12, n_frames=10, seed=5)
    return bids


@pytest.fixture
def aal116(shared_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The AAL116 image and a label table converted from its region list (index, name)."""
    folder = shared_dir / "realdata" / "development_fmri"
    rows = [line.split() for line in (folder / "AAL_116_RegionList.txt").read_text().splitlines()
            if line.strip()]
    table = tmp_path / "aal116.tsv"
    pd.DataFrame({"index": [int(r[0]) for r in rows], "name": [r[2] for r in rows]}).to_csv(
        table, sep="\t", index=False)
    return folder / "AAL_2mm_116parcel.nii.gz", table


def _run(bids: Path, out: Path, level: str, atlas: tuple[Path, Path], *extra: str) -> int:
    return main([str(bids), str(out), level, "--atlas", str(atlas[0]), "--atlas-labels",
                 str(atlas[1]), "-w", str(bids.parent / "work"), *COMMON, *extra])


def test_aal116_runs_the_whole_chain(demo: Path, aal116: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(demo, out, "pretrain", aal116, *PRETRAIN) == 0
    meta = json.loads((out / "models/desc-roi/model.json").read_text())
    assert meta["atlas"]["name"] == "AAL116parcel" and meta["atlas"]["n_regions"] == 116
    assert meta["model_card"]["atlas"]["sha256"] == load_atlas(*aal116).sha256()
    assert _run(demo, out, "participant", aal116, "--participant-label", "01") == 0
    # The others without attribution (the group level needs their embeddings only).
    assert _run(demo, out, "participant", aal116, "--no-reports", "--no-attribution") == 0
    func = out / "sub-01" / "func"
    stem = f"{PREFIX}_atlas-AAL116parcel_res-2_desc-roi"
    table = pd.read_csv(func / f"{stem}_attribution.tsv", sep="\t", na_values="n/a")
    assert len(table) == 116 and table["reconerror"].notna().sum() > 50
    by_group = pd.read_csv(func / f"{stem}_stat-bygroup_attribution.tsv", sep="\t")
    assert {"limbic", "cerebellum"} <= set(by_group["group"])   # derived from the AAL names
    recon = nib.load(func / f"{stem}_stat-reconerror_boldmap.nii.gz")
    assert recon.shape == nib.load(next(demo.rglob(f"{PREFIX}*_desc-preproc_bold.nii.gz"))).shape[:3]
    assert not list(out.rglob("*atlas-AAL3v1*"))
    assert (out / "sub-01.html").is_file()
    assert _run(demo, out, "group", aal116, "--target", "diagnosis", "--cv-folds", "2",
                "--cv-repeats", "1", "--n-permutations", "0") == 0
    group = out / "group"
    names = sorted(p.name for p in group.glob("*_attribution.tsv"))
    # The model's default readout and the fc and tangent baselines, each with its summary by
    # region group.
    stems = ["desc-roi_feature-connectivity", "feature-fc", "feature-tangent"]
    assert names == sorted(f"target-diagnosis_atlas-AAL116parcel_{stem}{stat}_attribution.tsv"
                           for stem in stems for stat in ("", "_stat-bygroup"))
    reconerror = (group / "target-diagnosis_atlas-AAL116parcel_desc-roi_feature-connectivity_"
                          "stat-reconerror_boldmap.nii.gz")
    assert reconerror.is_file() and reconerror.with_suffix("").with_suffix(".json").is_file()
    assert (out / "group_target-diagnosis.html").is_file()


def _kmeans_parcellation(shared_dir: Path, folder: Path, n_parcels: int = 30) -> tuple[Path, Path]:
    """A Schaefer-like parcellation: k-means clusters of brain voxel positions, per hemisphere."""
    brain_img = nib.load(shared_dir / "realdata/development_fmri/AAL_2mm_116parcel.nii.gz")
    brain = np.asarray(brain_img.dataobj) > 0
    voxels = np.argwhere(brain)
    mm = nib.affines.apply_affine(brain_img.affine, voxels)
    labels = np.zeros(brain.shape, dtype=np.int16)
    names = []
    for h, (hemi, side) in enumerate((("LH", mm[:, 0] < 0), ("RH", mm[:, 0] >= 0))):
        k = n_parcels // 2
        clusters = KMeans(k, n_init=1, random_state=0).fit_predict(mm[side])
        labels[tuple(voxels[side].T)] = clusters + 1 + h * k
        names += [f"7Networks_{hemi}_Parcel_{i + 1}" for i in range(k)]
    image = folder / "tpl-MNI152NLin6Asym_res-2_atlas-KMeans30_dseg.nii.gz"
    nib.save(nib.Nifti1Image(labels, brain_img.affine), image)
    table = folder / "tpl-MNI152NLin6Asym_res-2_atlas-KMeans30_dseg.tsv"
    pd.DataFrame({"index": np.arange(1, n_parcels + 1), "name": names}).to_csv(table, sep="\t",
                                                                                index=False)
    return image, table


def test_parcellation_without_groups(demo: Path, shared_dir: Path, tmp_path: Path) -> None:
    """No region groups: no summary by group; the atlas name is the file's ``atlas-`` entity."""
    atlas = _kmeans_parcellation(shared_dir, tmp_path)
    assert not load_atlas(*atlas).has_groups
    out = tmp_path / "out"
    assert _run(demo, out, "pretrain", atlas, *PRETRAIN) == 0
    assert _run(demo, out, "participant", atlas, "--participant-label", "01", "--no-reports") == 0
    func = out / "sub-01" / "func"
    stem = f"{PREFIX}_atlas-KMeans30_res-2_desc-roi"
    table = pd.read_csv(func / f"{stem}_attribution.tsv", sep="\t", na_values="n/a")
    assert len(table) == 30 and table["group"].isna().all()   # "n/a"
    assert table["reconerror"].notna().all()     # large parcels: each owns tokens
    assert not list(out.rglob("*bygroup*"))
    assert json.loads((func / f"{PREFIX}_res-2_desc-roi_embedding.json").read_text())[
        "Attribution"]["Atlas"] == "KMeans30"
    # Run again: the run is complete without a summary by group, so it is skipped.
    stamp = (func / f"{stem}_attribution.tsv").stat().st_mtime_ns
    assert _run(demo, out, "participant", atlas, "--participant-label", "01", "--no-reports") == 0
    assert (func / f"{stem}_attribution.tsv").stat().st_mtime_ns == stamp
    # The group level: region tables and maps, no summary by group, a report.
    assert _run(demo, out, "participant", atlas, "--no-reports", "--no-attribution") == 0
    assert _run(demo, out, "group", atlas, "--target", "diagnosis", "--cv-folds", "2",
                "--cv-repeats", "1", "--n-permutations", "0", "--compare", "roi", "fc") == 0
    group = out / "group"
    names = sorted(p.name for p in group.glob("*_attribution.tsv"))
    assert names == [f"target-diagnosis_atlas-KMeans30_{stem}_attribution.tsv"
                     for stem in ("desc-roi_feature-connectivity", "feature-fc")]
    table = pd.read_csv(group / names[0], sep="\t", na_values="n/a")
    assert len(table) == 30 and table["importance"].notna().all()
    assert not list(out.rglob("*bygroup*"))
    assert (out / "group_target-diagnosis.html").is_file()
