"""Tests of bidsapp.demo: a 4-participant demo written once per module and read back (and its twin
without the subregional effect), and a 16-participant one (40 frames, as ``roimae demo``) for the
coupling and subregional effects' known answers."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.connectome import ConnectivityMeasure
from scipy import ndimage, sparse, stats
from scipy.signal import detrend
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import bidsapp.demo as demo_module
from bidsapp.atlas import Atlas, Region, load_atlas
from bidsapp.bids.validation import run_bids_validator
from bidsapp.demo import (
    ADHD_AMPLITUDE,
    ADHD_REGIONS,
    ADHD_SHIFT,
    COUPLED_REGIONS,
    COUPLING,
    NETWORKS,
    NOISE_ONLY,
    SPLIT_REGIONS,
    SPLIT_SHARE,
    TRUTH_FILE,
    make_demo_dataset,
    split_halves,
)
from bidsapp.errors import UsageError

N_PARTICIPANTS = 4
N_FRAMES = 16
TR = 1.5
PARTICIPANTS = ("sub-01", "sub-02", "sub-03", "sub-04")
#: Region means of regions this small are dominated by thermal noise; left out of mean checks.
MIN_VOXELS = 20
#: The coupling demo: as many frames as ``roimae demo``, 8 participants per coupling level.
COUPLING_PARTICIPANTS = 16
COUPLING_FRAMES = 40


def _bold_path(root: Path, participant: str) -> Path:
    return (root / participant / "func" /
            f"{participant}_task-rest_space-MNI152NLin6Asym_res-2_desc-preproc_bold.nii.gz")


def _mask_path(root: Path, participant: str) -> Path:
    return (root / participant / "func" /
            f"{participant}_task-rest_space-MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz")


@pytest.fixture(scope="module")
def atlas(atlas_dir: Path) -> Atlas:
    # Explicit paths: module fixtures run before conftest's per-test ROIMAE_ATLAS_DIR.
    return load_atlas(atlas_dir / "AAL3v1_2mm.nii.gz", atlas_dir / "AAL3v1_labels.tsv")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, atlas: Atlas) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "bids"
    truth = make_demo_dataset(root, n_participants=N_PARTICIPANTS, n_frames=N_FRAMES, seed=7,
                              repetition_time=TR, atlas=atlas)
    return root, truth


@pytest.fixture(scope="module")
def participants(demo: tuple[Path, dict]) -> pd.DataFrame:
    return pd.read_csv(demo[0] / "participants.tsv", sep="\t")


@pytest.fixture(scope="module")
def region_means(demo: tuple[Path, dict], atlas: Atlas) -> dict[str, tuple[dict, float]]:
    """participant -> ({region name: (T,) mean time course}, run mean over the brain mask)."""
    labels = np.asarray(atlas.image.dataobj)
    counts = np.bincount(labels.ravel(), minlength=max(r.index for r in atlas.regions) + 1)
    regions = [r for r in atlas.regions if counts[r.index] >= MIN_VOXELS]
    index = [r.index for r in regions]
    means = {}
    for participant in PARTICIPANTS:
        bold = nib.load(_bold_path(demo[0], participant)).get_fdata(dtype=np.float32)
        brain = np.asanyarray(nib.load(_mask_path(demo[0], participant)).dataobj) > 0
        courses = np.array([ndimage.mean(bold[..., t], labels, index)
                            for t in range(bold.shape[3])]).T  # (regions, T)
        means[participant] = (dict(zip([r.name for r in regions], courses, strict=True)),
                              float(bold[brain].mean()))
    return means


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    # Linear detrending removes the planted scanner drift, as any analysis would.
    return float(np.corrcoef(detrend(a), detrend(b))[0, 1])


def test_files_and_headers(demo: tuple[Path, dict], atlas: Atlas) -> None:
    root, _ = demo
    for participant in PARTICIPANTS:
        bold = nib.load(_bold_path(root, participant))
        mask = nib.load(_mask_path(root, participant))
        assert bold.shape == (91, 109, 91, N_FRAMES)
        assert mask.shape == (91, 109, 91)
        assert np.array_equal(bold.affine, atlas.image.affine)
        assert np.array_equal(mask.affine, atlas.image.affine)
        assert bold.get_data_dtype() == np.int16
        assert bold.dataobj.slope == 0.5
        assert bold.header.get_zooms() == (2.0, 2.0, 2.0, TR)
        assert bold.header.get_xyzt_units() == ("mm", "sec")
        assert mask.get_data_dtype() == np.uint8
        brain = np.asanyarray(mask.dataobj)
        assert set(np.unique(brain).tolist()) == {0, 1}
        data = np.asanyarray(bold.dataobj)
        assert np.all(data[brain == 0] == 0)
        assert np.all(data[brain == 1] > 0)
        # The mask holds every AAL3 voxel and looks like a brain mask (~220k voxels at 2 mm).
        assert np.all(brain[np.asarray(atlas.image.dataobj) > 0] == 1)
        assert 190_000 < brain.sum() < 260_000
        sidecar = json.loads(_bold_path(root, participant).with_suffix("").with_suffix(
            ".json").read_text())
        assert sidecar["RepetitionTime"] == TR
        assert sidecar["TaskName"] == "rest"
        assert sidecar["SkullStripped"] is False
        assert _mask_path(root, participant).with_suffix("").with_suffix(".json").is_file()
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "roimae demo"
    assert (root / "README").is_file()
    assert (root / "participants.json").is_file()


def test_participants_are_balanced(participants: pd.DataFrame) -> None:
    assert list(participants.columns) == ["participant_id", "diagnosis", "age", "sex", "site",
                                          "coupling", "subregional"]
    assert tuple(participants["participant_id"]) == PARTICIPANTS
    assert participants["diagnosis"].value_counts().to_dict() == {"control": 2, "adhd": 2}
    for _, site in participants.groupby("site"):
        assert sorted(site["diagnosis"]) == ["adhd", "control"]
    # One participant per diagnosis x site cell: coupling is balanced within diagnosis and site.
    for column in ("diagnosis", "site"):
        for _, group in participants.groupby(column):
            assert sorted(group["coupling"]) == ["coupled", "uncoupled"], column
    assert set(participants["site"]) == {"siteA", "siteB"}
    assert set(participants["sex"]) <= {"M", "F"}
    # Four participants cannot balance a fourth binary label against three: overall only.
    assert participants["subregional"].value_counts().to_dict() == {"split": 2, "whole": 2}


def test_truth_record(demo: tuple[Path, dict], participants: pd.DataFrame) -> None:
    root, truth = demo
    assert json.loads((root / TRUTH_FILE).read_text()) == truth
    assert TRUTH_FILE in (root / ".bidsignore").read_text().split()
    assert truth["seed"] == 7
    assert truth["repetition_time"] == TR
    assert truth["n_frames"] == N_FRAMES
    effect = truth["adhd_effect"]
    # Label values from the shared AAL3v1 table.
    assert effect["regions"] == [
        {"name": "Hippocampus_L", "index": 41}, {"name": "Hippocampus_R", "index": 42},
        {"name": "Amygdala_L", "index": 45}, {"name": "Amygdala_R", "index": 46},
        {"name": "Cerebelum_Crus1_L", "index": 95}, {"name": "Cerebelum_Crus1_R", "index": 96},
    ]
    assert effect["amplitude_factor"] == ADHD_AMPLITUDE
    assert effect["baseline_shift"] == ADHD_SHIFT
    assert len(truth["networks"]) == 6
    assert [r["name"] for r in truth["networks"]["limbic"]] == list(NETWORKS["limbic"])
    assert len(truth["noise_only"]) == 20
    coupling = truth["coupling_effect"]
    assert coupling["regions"] == [
        {"name": "Frontal_Sup_2_L", "index": 3}, {"name": "Frontal_Sup_2_R", "index": 4},
        {"name": "Frontal_Mid_2_L", "index": 5}, {"name": "Frontal_Mid_2_R", "index": 6},
        {"name": "Parietal_Sup_L", "index": 63}, {"name": "Parietal_Sup_R", "index": 64},
        {"name": "Temporal_Mid_L", "index": 89}, {"name": "Temporal_Mid_R", "index": 90},
        {"name": "Occipital_Mid_L", "index": 55}, {"name": "Occipital_Mid_R", "index": 56},
    ]
    assert coupling["label_column"] == "coupling"
    assert set(coupling["levels"]) == {"coupled", "uncoupled"}
    assert coupling["course_correlation"] == COUPLING
    planted = {r["name"] for r in effect["regions"]} | {r["name"] for r in truth["noise_only"]}
    planted |= {r["name"] for regions in truth["networks"].values() for r in regions}
    assert planted.isdisjoint(COUPLED_REGIONS)
    assert "coupling effect" in truth["signal_model"]
    assert "AR(1)" in truth["signal_model"]
    subregional = truth["subregional_effect"]
    assert [(r["name"], r["index"]) for r in subregional["regions"]] == [
        ("Fusiform_L", 59), ("Fusiform_R", 60), ("Parietal_Inf_L", 65), ("Parietal_Inf_R", 66),
        ("Cingulate_Mid_L", 37), ("Cingulate_Mid_R", 38), ("Insula_L", 33), ("Insula_R", 34)]
    assert [r["name"] for r in subregional["regions"]] == list(SPLIT_REGIONS)
    assert subregional["label_column"] == "subregional"
    assert set(subregional["levels"]) == {"split", "whole"}
    assert subregional["variance_share"] == SPLIT_SHARE
    assert subregional["independent_of"] == ["diagnosis", "site", "coupling"]
    for region in subregional["regions"]:
        # Large regions: every half's core spreads over several 16 mm tokens of the tiny grid.
        assert min(region["tokens"]) >= 3 and min(region["core_voxels"]) >= 300, region
        # The smaller half (by summed baseline, about its voxel count) has |h| = 1.
        h_a, h_b = region["h"]
        small, large = sorted(region["core_voxels"])
        assert h_a > 0 > h_b and max(h_a, -h_b) == 1, region
        assert abs(min(h_a, -h_b) - small / large) < 0.02, region
    planted |= {r["name"] for r in coupling["regions"]}
    assert planted.isdisjoint(SPLIT_REGIONS)
    assert "subregional effect" in truth["signal_model"]
    recorded = pd.DataFrame(truth["participants"])
    assert recorded["diagnosis"].tolist() == participants["diagnosis"].tolist()
    assert recorded["coupling"].tolist() == participants["coupling"].tolist()
    assert recorded["subregional"].tolist() == participants["subregional"].tolist()


def test_passes_bids_validator(demo: tuple[Path, dict]) -> None:
    issues = run_bids_validator(demo[0], timeout=120)
    errors = [issue for issue in issues if issue.severity == "error"]
    assert errors == []


def test_network_regions_correlate_noise_regions_do_not(region_means: dict) -> None:
    for network, names in NETWORKS.items():
        r = [_correlation(means[a], means[b]) for means, _ in region_means.values()
             for i, a in enumerate(names) for b in names[i + 1:]]
        assert np.mean(r) > 0.7, network
    # Each noise-only region against its contralateral homologue (an independent process).
    r = [_correlation(means[left], means[left[:-1] + "R"]) for means, _ in region_means.values()
         for left in NOISE_ONLY if left.endswith("_L")]
    assert abs(np.mean(r)) < 0.3


def test_planted_baseline_shift(region_means: dict, participants: pd.DataFrame) -> None:
    # Within a site, region run mean / brain run mean of the adhd participant over the control's.
    # Known answer: 1 + ADHD_SHIFT in the planted regions (a little less: the brain mean holds them too),
    # 1 elsewhere; fluctuations have zero run mean, so only thermal noise blurs it.
    for _, site in participants.groupby("site"):
        by_diagnosis = dict(zip(site["diagnosis"], site["participant_id"], strict=True))
        adhd, control = region_means[by_diagnosis["adhd"]], region_means[by_diagnosis["control"]]
        ratio = {name: (adhd[0][name].mean() / adhd[1]) / (control[0][name].mean() / control[1])
                 for name in adhd[0]}
        planted = np.array([ratio[name] for name in ADHD_REGIONS])
        others = np.array([v for name, v in ratio.items() if name not in ADHD_REGIONS])
        assert np.all((planted > 1 + 0.75 * ADHD_SHIFT) & (planted < 1 + 1.05 * ADHD_SHIFT)), planted
        assert np.all(np.abs(others - 1) < 0.005), others


def test_planted_amplitude(region_means: dict, participants: pd.DataFrame) -> None:
    # Planted regions share their network's course with unplanted partners: the SD ratio of the
    # region means is the planted amplitude factor in adhd participants and 1 in controls.
    pairs = [("Hippocampus", "ParaHippocampal"), ("Amygdala", "ParaHippocampal"),
             ("Cerebelum_Crus1", "Cerebelum_Crus2")]
    for participant, diagnosis in zip(participants["participant_id"], participants["diagnosis"],
                                      strict=True):
        means = region_means[participant][0]
        ratio = np.mean([np.std(means[f"{a}_{side}"]) / np.std(means[f"{b}_{side}"])
                         for a, b in pairs for side in "LR"])
        expected = ADHD_AMPLITUDE if diagnosis == "adhd" else 1.0
        assert abs(ratio - expected) < 0.2, (participant, ratio)


@pytest.fixture(scope="module")
def coupling_demo(tmp_path_factory: pytest.TempPathFactory, atlas: Atlas
                  ) -> tuple[pd.DataFrame, list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(participants, region names, (P, T, R) region mean courses, (P,) brain run means,
    (P, T, 2 x len(SPLIT_REGIONS)) mean courses of the split regions' halves, A then B each).

    Regions with at least MIN_VOXELS voxels; courses averaged from the stored int16 values (the
    slope is applied after averaging, which is linear) through one sparse matrix, which is fast.
    """
    root = tmp_path_factory.mktemp("coupling") / "bids"
    make_demo_dataset(root, n_participants=COUPLING_PARTICIPANTS, n_frames=COUPLING_FRAMES,
                      seed=11, repetition_time=2.0, atlas=atlas)
    labels = np.asarray(atlas.image.dataobj).astype(np.int64).ravel(order="F")
    counts = np.bincount(labels)
    regions = [r for r in atlas.regions if r.index < len(counts) and counts[r.index] >= MIN_VOXELS]
    column = np.full(len(counts), -1)
    column[[r.index for r in regions]] = np.arange(len(regions))
    voxels = np.flatnonzero(column[labels] >= 0)
    average = sparse.csr_matrix((1.0 / counts[labels[voxels]], (column[labels[voxels]], voxels)),
                                shape=(len(regions), len(labels)))
    halves = [half for split in split_halves(atlas) for half in (split.half_a, split.half_b)]
    half_average = sparse.csr_matrix((np.concatenate([np.full(len(h), 1.0 / len(h)) for h in halves]),
                                      (np.repeat(np.arange(len(halves)), [len(h) for h in halves]),
                                       np.concatenate(halves))), shape=(len(halves), len(labels)))
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    courses, brain_means, half_courses = [], [], []
    for participant in participants["participant_id"]:
        bold = nib.load(_bold_path(root, participant))
        data = bold.dataobj.get_unscaled().reshape(len(labels), -1, order="F")  # (X*Y*Z, T)
        courses.append(bold.dataobj.slope * (average @ data.astype(np.float32)).T)
        half_courses.append(bold.dataobj.slope * (half_average @ data.astype(np.float32)).T)
        brain = np.asanyarray(nib.load(_mask_path(root, participant)).dataobj).ravel(order="F") > 0
        brain_means.append(bold.dataobj.slope * data[brain].mean())
    return (participants, [r.name for r in regions], np.array(courses), np.array(brain_means),
            np.array(half_courses))


def test_coupling_changes_covariance_only(coupling_demo: tuple) -> None:
    participants, names, courses, brain_means, _ = coupling_demo
    for column in ("diagnosis", "site"):  # balanced within each cell of 4
        for _, group in participants.groupby(column):
            assert group["coupling"].value_counts().to_dict() == {"coupled": 4, "uncoupled": 4}
    coupled = (participants["coupling"] == "coupled").to_numpy()
    planted = courses[:, :, [names.index(name) for name in COUPLED_REGIONS]]  # (P, T, 10)
    # Run means relative to the brain's (which removes site scale and participant gain), and the
    # SD of each mean signal relative to its run mean: the model gives both groups the same
    # baselines and amplitudes (every course has SD 1), so only noise separates the groups.
    level = planted.mean(axis=1) / brain_means[:, None]  # (P, 10)
    spread = planted.std(axis=1) / planted.mean(axis=1)  # (P, 10)
    for moment, bound in ((level, 0.002), (spread, 0.05)):
        ratio = moment[coupled].mean(axis=0) / moment[~coupled].mean(axis=0)
        t = stats.ttest_ind(moment[coupled], moment[~coupled], equal_var=False).statistic
        assert np.all(np.abs(ratio - 1) < bound) and np.all(np.abs(t) < 3), (ratio, t)
    # ... while the planted regions' mean signals correlate by COUPLING in coupled participants
    # (region means average the smooth noise away) and not at all in uncoupled ones.
    upper = np.triu_indices(len(COUPLED_REGIONS), k=1)
    r = np.array([np.corrcoef(p.T)[upper].mean() for p in planted])  # (P,)
    assert np.all(np.abs(r[coupled] - COUPLING) < 0.1) and np.all(np.abs(r[~coupled]) < 0.15), r


def _balanced_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=0)
    return float(cross_val_score(model, features, labels, cv=folds,
                                 scoring="balanced_accuracy").mean())


def test_coupling_is_found_by_connectivity_not_by_means(coupling_demo: tuple) -> None:
    # The known answer a region-aware readout must reach: whole-brain functional connectivity
    # (every region, nothing selected) classifies coupling; per-region mean and SD do not.
    participants, _, courses, _, _ = coupling_demo
    labels = (participants["coupling"] == "coupled").to_numpy()
    connectivity = ConnectivityMeasure(kind="correlation", vectorize=True,
                                       discard_diagonal=True).fit_transform(list(courses))
    moments = np.concatenate([courses.mean(axis=1), courses.std(axis=1)], axis=1)  # (P, 2R)
    fc, mean_sd = _balanced_accuracy(connectivity, labels), _balanced_accuracy(moments, labels)
    assert fc >= 0.85, (fc, mean_sd)
    assert mean_sd <= 0.7, (fc, mean_sd)


@pytest.fixture(scope="module")
def whole_twin(tmp_path_factory: pytest.TempPathFactory, atlas: Atlas) -> Path:
    """The 4-participant demo with every participant ``whole``: the same draws otherwise (the
    main stream does not feed the subregional effect)."""
    root = tmp_path_factory.mktemp("whole") / "bids"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_module, "draw_subregional", lambda rng, participants: ["whole"] * len(
            participants))
        make_demo_dataset(root, n_participants=N_PARTICIPANTS, n_frames=N_FRAMES, seed=7,
                          repetition_time=TR, atlas=atlas)
    return root


def _voxels(root: Path, participant: str) -> np.ndarray:
    """(X*Y*Z, T) float64 BOLD values, Fortran-order voxels."""
    bold = nib.load(_bold_path(root, participant))
    return bold.dataobj.slope * np.asanyarray(bold.dataobj.get_unscaled(), dtype=np.float64
                                              ).reshape(-1, bold.shape[3], order="F")


def test_split_leaves_region_means_unchanged(demo: tuple[Path, dict], whole_twin: Path,
                                             participants: pd.DataFrame, atlas: Atlas) -> None:
    """Known answer: in ``split`` participants only the split regions' core voxels change; every
    region's mean time series is the same as without the effect (to int16 rounding), while the
    two halves carry the region's course in opposite phase, weighted by h."""
    root, truth = demo
    labels = np.asarray(atlas.image.dataobj).astype(np.int64).ravel(order="F")
    splits = split_halves(atlas)
    core = np.concatenate([np.concatenate([s.half_a, s.half_b]) for s in splits])
    sd_ratios = []
    assert np.isin(labels[core], [r["index"] for r in truth["subregional_effect"]["regions"]]).all()
    for participant, level in zip(participants["participant_id"], participants["subregional"],
                                  strict=True):
        planted, plain = _voxels(root, participant), _voxels(whole_twin, participant)
        if level == "whole":
            assert np.array_equal(planted, plain)
            continue
        changed = np.flatnonzero((planted != plain).any(axis=1))
        assert np.isin(changed, core).all() and len(changed) > 0.99 * len(core)
        for region in atlas.regions:
            voxels = labels == region.index
            if voxels.any():
                # int16 rounding (slope 0.5) moves a voxel by at most 0.25 in either run.
                difference = planted[voxels].mean(axis=0) - plain[voxels].mean(axis=0)
                assert np.abs(difference).max() < 0.02, (participant, region.name)
        for split, record in zip(splits, truth["subregional_effect"]["regions"], strict=True):
            change_a = (planted[split.half_a] - plain[split.half_a]).mean(axis=0)  # (T,)
            change_b = (planted[split.half_b] - plain[split.half_b]).mean(axis=0)
            assert np.corrcoef(change_a, change_b)[0, 1] < -0.95, split.name
            ratio = change_a.std() / change_b.std()
            assert abs(ratio / abs(record["h"][0] / record["h"][1]) - 1) < 0.1, split.name
            voxels = np.concatenate([split.half_a, split.half_b])
            sd_ratios.append(np.median(planted[voxels].std(axis=1) / plain[voxels].std(axis=1)))
    # Variance-neutral in expectation: the median voxel keeps its SD, up to the sample
    # correlations of one region's course with the others over 16 frames.
    assert abs(np.mean(np.log(sd_ratios))) < 0.05 and np.all(np.abs(np.log(sd_ratios)) < 0.25), \
        sd_ratios


def test_subregional_is_invisible_to_region_means_but_not_to_halves(coupling_demo: tuple) -> None:
    """The known answer of the subregional effect: region mean signals (their whole-brain
    connectivity, their mean and SD) stay at chance, the correlation between the halves of the
    split regions (what a readout inside the regions can see) separates the groups."""
    participants, _, courses, _, halves = coupling_demo
    # Two participants per diagnosis x site x coupling cell: one of each level in every cell.
    for _, cell in participants.groupby(["diagnosis", "site", "coupling"]):
        assert sorted(cell["subregional"]) == ["split", "whole"]
    labels = (participants["subregional"] == "split").to_numpy()
    connectivity = ConnectivityMeasure(kind="correlation", vectorize=True,
                                       discard_diagonal=True).fit_transform(list(courses))
    moments = np.concatenate([courses.mean(axis=1), courses.std(axis=1)], axis=1)  # (P, 2R)
    within = np.array([[_correlation(p[:, 2 * j], p[:, 2 * j + 1])
                        for j in range(len(SPLIT_REGIONS))] for p in halves])  # (P, 4)
    fc, mean_sd = _balanced_accuracy(connectivity, labels), _balanced_accuracy(moments, labels)
    inside = _balanced_accuracy(within, labels)
    assert fc <= 0.6 and mean_sd <= 0.6, (fc, mean_sd, inside)
    assert inside >= 0.9, (fc, mean_sd, inside)
    # The halves anti-correlate in split participants only.
    assert np.all(within[labels].mean(axis=1) < np.min(within[~labels].mean(axis=1))), within


def test_seed_reproducibility(tmp_path: Path, atlas: Atlas) -> None:
    def first_run(seed: int, name: str) -> np.ndarray:
        make_demo_dataset(tmp_path / name, n_participants=4, n_frames=3, seed=seed, atlas=atlas)
        return np.asanyarray(nib.load(_bold_path(tmp_path / name, "sub-01")).dataobj)

    first = first_run(0, "a")
    assert np.array_equal(first, first_run(0, "b"))
    assert (tmp_path / "a" / "participants.tsv").read_text() == (
        tmp_path / "b" / "participants.tsv").read_text()
    assert not np.array_equal(first, first_run(1, "c"))


def test_usage_errors(tmp_path: Path, atlas: Atlas) -> None:
    with pytest.raises(UsageError, match="4 participants"):
        make_demo_dataset(tmp_path, n_participants=3, atlas=atlas)
    with pytest.raises(UsageError, match="frames"):
        make_demo_dataset(tmp_path, n_frames=1, atlas=atlas)
    not_aal = Atlas(name="toy", image=atlas.image,
                    regions=tuple(Region(r.index, f"R{r.index}", "n/a", "n/a")
                                  for r in atlas.regions), source="test")
    with pytest.raises(UsageError, match="lacks"):
        make_demo_dataset(tmp_path, n_participants=4, n_frames=2, atlas=not_aal)
