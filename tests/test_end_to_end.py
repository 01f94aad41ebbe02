"""The demo chain end to end: pretrain (roi, random) -> participant -> group, with known answers.

One run of :func:`bidsapp.cli.demo.run_demo_chain` (what ``roimae demo DIR --run`` does) on the demo
dataset is shared by every test here; each test checks one promise of the pretrain, participant or
group level against the planted truth recorded in ``roimae_demo_truth.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsapp.atlas import load_atlas
from bidsapp.bids.validation import run_bids_validator
from bidsapp.cli.demo import DEMO_MASKINGS, DEMO_READOUTS, demo_configs, run_demo_chain
from bidsapp.config import BASELINES
from bidsapp.demo import make_demo_dataset
from bidsapp.levels import run
from bidsapp.logs import setup_logging
from bidsapp.outputs import NOTE_CANNOT_BE_HIDDEN, NOTE_HIDDEN_BY_VOXEL

pytestmark = pytest.mark.slow

N_PARTICIPANTS = 24


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("chain")
    bids, out = root / "bids", root / "derivatives"
    truth = make_demo_dataset(bids, n_participants=N_PARTICIPANTS, n_frames=40, seed=0)
    setup_logging(0)
    report = run_demo_chain(bids, out, nprocs=1, n_permutations=200)
    return {"bids": bids, "out": out, "truth": truth, "report": report}


def _names(records: list) -> list[str]:
    return [r["name"] if isinstance(r, dict) else r for r in records]


def _region_tables(out: Path, desc: str) -> pd.DataFrame:
    tables = sorted(out.glob(f"sub-*/func/*_desc-{desc}_attribution.tsv"))
    assert len(tables) == N_PARTICIPANTS
    return pd.concat([pd.read_csv(t, sep="\t", na_values="n/a") for t in tables])


@pytest.mark.parametrize("desc", ["roi", "random"])
def test_pretraining_lowers_the_held_out_loss(chain: dict, desc: str) -> None:
    log = pd.read_csv(chain["out"] / f"models/desc-{desc}/training_log.tsv", sep="\t")
    first, last = log["val_loss"].iloc[0], log["val_loss"].iloc[-1]
    assert last < 0.85 * first, (first, last)


def test_participant_outputs_for_every_run(chain: dict) -> None:
    out = chain["out"]
    atlas = load_atlas()
    for desc in ("roi", "random"):
        bolds = sorted(chain["bids"].glob("sub-*/func/*_desc-preproc_bold.nii.gz"))
        assert len(bolds) == N_PARTICIPANTS
        for bold_path in bolds[:3]:
            prefix = bold_path.name.split("_desc-")[0]
            atlas_prefix = prefix.replace("_res-", "_atlas-AAL3v1_res-")  # BIDS entity order
            func = out / bold_path.relative_to(chain["bids"]).parent
            windows = pd.read_csv(func / f"{prefix}_desc-{desc}_embedding.tsv", sep="\t")
            mean = pd.read_csv(func / f"{prefix}_desc-{desc}_stat-mean_embedding.tsv", sep="\t")
            dims = [c for c in windows.columns if re.fullmatch(r"e\d{3}", c)]
            assert len(windows) == 4 and list(mean.columns) == dims
            # The run embedding is the mean of the window embeddings.
            np.testing.assert_allclose(windows[dims].mean().to_numpy(), mean.to_numpy()[0],
                                       rtol=1e-5, atol=1e-6)
            sidecar = json.loads((func / f"{prefix}_desc-{desc}_embedding.json").read_text())
            assert sidecar["Model"]["Masking"] == desc and len(sidecar["Model"]["SHA256"]) == 64
            assert sidecar["NumberOfWindows"] == 4 and sidecar["Sources"][0].startswith("bids:")
            bold = nib.load(bold_path)
            table = pd.read_csv(func / f"{atlas_prefix}_desc-{desc}_attribution.tsv",
                                sep="\t", na_values="n/a")
            assert len(table) == 166
            labels = atlas.contiguous(atlas.resample_to(bold.shape[:3], bold.affine))
            for stat, column in (("reconerror", "reconerror"), ("occlusion", "occlusion")):
                img = nib.load(func / f"{atlas_prefix}_desc-{desc}_stat-{stat}_boldmap.nii.gz")
                assert img.shape == bold.shape[:3]
                np.testing.assert_allclose(img.affine, bold.affine)
                data = np.asarray(img.dataobj)
                # Every region with a token carries one constant value: its table value.
                for r in np.flatnonzero(table["tokens"].to_numpy() > 0)[::10]:
                    values = np.unique(data[labels == r])
                    assert values.size == 1
                    np.testing.assert_allclose(values[0], table[column].iloc[r], rtol=1e-5)
            # Regions too small to own a token of the tiny grid (the amygdalae among them) are
            # hidden voxel by voxel and say so; only a region without a brain voxel on the 4 mm
            # working grid cannot be hidden, and says that.
            no_token = table["tokens"] == 0
            assert table.loc[no_token, "note"].isin(
                [NOTE_HIDDEN_BY_VOXEL, NOTE_CANNOT_BE_HIDDEN]).all()
            by_voxel = table["note"] == NOTE_HIDDEN_BY_VOXEL
            assert by_voxel.sum() > 40
            assert table.loc[by_voxel, ["reconerror", "occlusion"]].notna().all().all()
            assert by_voxel[table["name"].isin(["Amygdala_L", "Amygdala_R"])].all()
            unhidden = table["reconerror"].isna()
            assert unhidden.sum() <= 1
            assert (table.loc[unhidden, "note"] == NOTE_CANNOT_BE_HIDDEN).all()
            # Representation sensitivity is a distance: non-negative, and far above float
            # resolution.
            sensitivity = table["occlusion"].dropna()
            assert (sensitivity >= 0).all() and sensitivity.median() > 1e-3


def test_coherent_regions_are_reconstructed_better_than_noise_only_regions(chain: dict) -> None:
    truth = chain["truth"]
    network = {n for regions in truth["networks"].values() for n in _names(regions)}
    noise = set(_names(truth["noise_only"]))
    errors = _region_tables(chain["out"], "roi").groupby("name")["reconerror"].mean().dropna()
    coherent, noisy = errors[errors.index.isin(network)], errors[errors.index.isin(noise)]
    assert len(coherent) >= 20 and len(noisy) >= 10
    # A ranking with a margin: the median coherent region beats the median noise-only region
    # clearly, and most coherent regions rank above most noise-only ones.
    assert coherent.median() < 0.85 * noisy.median(), (coherent.median(), noisy.median())
    auc = (coherent.to_numpy()[:, None] < noisy.to_numpy()[None, :]).mean()
    assert auc > 0.75, auc


def test_group_classification_beats_chance(chain: dict) -> None:
    group = chain["out"] / "group"
    scores = pd.read_csv(group / "target-diagnosis_scores.tsv", sep="\t",
                         na_values="n/a").set_index("set")
    sets = [f"{d}-{r}" for d in DEMO_MASKINGS for r in DEMO_READOUTS] + list(BASELINES)
    assert scores.index.tolist() == sets
    # The diagnosis effect is an amplitude and baseline change: first-order readouts see it.
    for desc in DEMO_MASKINGS:
        for readout in ("region", "global"):
            metrics = pd.read_csv(group / f"target-diagnosis_desc-{desc}_feature-{readout}_"
                                  "metrics.tsv", sep="\t", na_values="n/a").set_index("metric")
            assert metrics.loc["balanced_accuracy", "mean"] > 0.7
            assert metrics.loc["balanced_accuracy", "permutation_p"] < 0.05
    # Age and sex were drawn independently of the diagnosis.
    assert scores.loc["covariates", "permutation_p"] > 0.05
    comparison = pd.read_csv(group / "target-diagnosis_comparison.tsv", sep="\t", na_values="n/a")
    assert len(comparison) == len(sets) * (len(sets) - 1) // 2
    assert (comparison["folds"] == 25).all()


def test_runs_of_a_participant_never_straddle_folds(chain: dict) -> None:
    predictions = pd.read_csv(chain["out"] / "group/target-diagnosis_desc-roi_feature-global_"
                              "predictions.tsv", sep="\t")
    folds_per_participant = predictions.groupby(["repeat", "participant_id"])["fold"].nunique()
    assert (folds_per_participant == 1).all()
    # Every participant is tested exactly once per repeat.
    assert (predictions.groupby("repeat")["participant_id"].nunique() == N_PARTICIPANTS).all()


@pytest.mark.parametrize("desc", ["roi", "random"])
def test_group_attribution_ranks_the_planted_regions_first(chain: dict, desc: str) -> None:
    """The planted (limbic and cerebellar) regions lead the importance of the region readout.

    Hiding a region's features from the classifier reaches every region, the amygdalae too (too
    small to own a token of the tiny grid), and needs no sampled occlusion, so its precision
    resolves the planted regions: the top region group is limbic or cerebellum, and the planted
    regions beat the others on average by more than two standard errors.
    """
    planted = set(_names(chain["truth"]["adhd_effect"]["regions"]))
    table = pd.read_csv(chain["out"] / f"group/target-diagnosis_atlas-AAL3v1_desc-{desc}_"
                        "feature-region_attribution.tsv", sep="\t", na_values="n/a")
    assert table.loc[table["name"].isin(planted), "importance"].notna().sum() == len(planted)
    table = table.dropna(subset=["importance"])
    by_group = table.groupby("group")["importance"].mean().sort_values(ascending=False)
    assert by_group.index[0] in {"limbic", "cerebellum"}, by_group
    is_planted = table["name"].isin(planted)
    others = table.loc[~is_planted, "importance"]
    margin = table.loc[is_planted, "importance"].mean() - others.mean()
    assert margin > 2 * others.std(ddof=1) / np.sqrt(is_planted.sum()), margin


@pytest.mark.parametrize("desc", ["roi", "random"])
def test_group_attribution_of_the_run_embedding_covers_every_hidden_region(chain: dict,
                                                                           desc: str) -> None:
    """The run embedding's importance comes from the participant level's occluded embeddings:
    a value and a standard error for every region the participant level could hide (by its
    tokens or, if it owns none, by its voxels), none for the others.

    Its precision at the demo's compute (6 region subsets per window) does not resolve the
    planted regions; the region readout's does (the test above).
    """
    table = pd.read_csv(chain["out"] / f"group/target-diagnosis_atlas-AAL3v1_desc-{desc}_"
                        "feature-global_attribution.tsv", sep="\t", na_values="n/a")
    note = _region_tables(chain["out"], desc).groupby("name", sort=False)["note"].first()
    hidden = (table["name"].map(note) != NOTE_CANNOT_BE_HIDDEN).to_numpy()
    assert hidden.sum() >= 160
    assert table.loc[hidden, ["importance", "importance_se"]].notna().all().all()
    assert table.loc[~hidden, "importance"].isna().all()


def test_covariance_only_effect_is_found_by_the_connectivity_readout(chain: dict) -> None:
    """``coupling`` changes only correlations: the connectivity readout and fc see it, a mean
    over frames (the region readout) does not."""
    config = demo_configs(chain["bids"], chain["out"])[-1]
    config = config.model_copy(update={"group": config.group.model_copy(update={
        "target": "coupling", "compare": ["roi", "fc"], "features": ["connectivity", "region"],
        "covariates": [], "n_permutations": 0, "cv_repeats": 1})})
    assert run(config) == 0
    scores = pd.read_csv(chain["out"] / "group/target-coupling_scores.tsv", sep="\t",
                         na_values="n/a").set_index("set")["balanced_accuracy"]
    assert scores["roi-connectivity"] >= 0.75, scores
    assert scores["fc"] >= 0.75, scores
    assert scores["roi-region"] < scores["roi-connectivity"] - 0.2, scores


def test_structure_inside_regions_is_found_by_the_subregion_readout_only(chain: dict) -> None:
    """``subregional`` leaves every region's mean time series unchanged (the demo's known
    answer): region-mean FC and the tangent space stay at chance by construction, the subregion
    readout of a model finds it, and its region importance puts the split regions on top."""
    config = demo_configs(chain["bids"], chain["out"])[-1]
    config = config.model_copy(update={"group": config.group.model_copy(update={
        "target": "subregional", "compare": [*DEMO_MASKINGS, "fc", "tangent"],
        "features": ["subregion", "inputsubregion", "region"], "covariates": [],
        "n_permutations": 0})})
    assert run(config) == 0
    group = chain["out"] / "group"
    scores = pd.read_csv(group / "target-subregional_scores.tsv", sep="\t",
                         na_values="n/a").set_index("set")["balanced_accuracy"]
    assert max(scores[f"{desc}-subregion"] for desc in DEMO_MASKINGS) >= 0.8, scores
    assert scores["fc"] <= 0.6 and scores["tangent"] <= 0.6, scores
    planted = set(_names(chain["truth"]["subregional_effect"]["regions"]))
    for desc in DEMO_MASKINGS:
        if scores[f"{desc}-subregion"] < 0.8:
            continue
        table = pd.read_csv(group / f"target-subregional_atlas-AAL3v1_desc-{desc}_"
                            "feature-subregion_attribution.tsv", sep="\t",
                            na_values="n/a").dropna(subset=["importance"])
        is_planted = table["name"].isin(planted)
        assert is_planted.sum() == len(planted)
        others = table.loc[~is_planted, "importance"]
        margin = table.loc[is_planted, "importance"].mean() - others.median()
        assert margin > 2 * others.std(ddof=1) / np.sqrt(is_planted.sum()), (desc, margin)
    report = (chain["out"] / "group_target-subregional.html").read_text()
    assert "within-region structure" in report


def test_whole_output_passes_the_bids_validator(chain: dict) -> None:
    errors = [i for i in run_bids_validator(chain["out"]) if i.severity == "error"]
    assert errors == []


def test_reports_open_and_show_their_figures(chain: dict) -> None:
    out = chain["out"]
    assert chain["report"] == out / "group_target-diagnosis.html"
    for report in (chain["report"], out / "sub-01.html"):
        html = report.read_text()
        images = re.findall(r"<img src='([^']+)'", html)
        assert len(images) >= 5
        for src in images:
            assert not src.startswith(("http:", "https:", "/"))
            assert (out / src).stat().st_size > 2000
        assert "http://" not in html and "https://" not in html

