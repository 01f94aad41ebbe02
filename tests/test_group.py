"""The group level on synthetic embeddings (no model): folds, statistics, targets, input checks.

The end-to-end tests write fake participant-level outputs (run embeddings with a planted class
difference, and optionally occluded embeddings) for a demo dataset, at the paths
:class:`bidsapp.outputs.RunOutputs` gives, and run ``roimae BIDS OUT group`` on them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from threadpoolctl import threadpool_limits

from bidsapp.atlas import Atlas, load_atlas
from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.bids.layout import discover_runs
from bidsapp.bids.participants import read_participants
from bidsapp.classification import (
    corrected_ttest,
    effective_rank,
    evaluate,
    fold_metrics,
    make_splits,
    permutation_pvalue,
)
from bidsapp.cli import build_parser, config_from_args, main
from bidsapp.config import Config
from bidsapp.demo import make_demo_dataset
from bidsapp.errors import BadDataError, ExitCode
from bidsapp.features import EmbeddingSet, tangent_space
from bidsapp.logs import get_logger
from bidsapp.outputs import RunOutputs, atlas_label
from bidsapp.phenotypes import read_targets

N_DIMS = 8
N_PARTICIPANTS = 20
#: Region whose occlusion removes the planted class difference, and one that cannot be hidden.
KEY_REGION = "Cerebelum_6_L"
HIDDEN_REGION = "Vermis_1_2"


# --- make_splits --------------------------------------------------------------------------------

def _two_runs_each(n: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, participant ids and sites of ``n`` participants x 2 runs (runs interleaved)."""
    rng = np.random.default_rng(5)
    diagnosis = rng.permutation(np.repeat(["adhd", "control"], n // 2))
    site = np.array([f"site{i % 6}" for i in range(n)])
    pid = np.array([f"sub-{i:02d}" for i in range(n)])
    order = np.concatenate([np.arange(n), np.arange(n)])       # run 1 of all, then run 2
    return diagnosis[order], pid[order], site[order]


@pytest.mark.parametrize("by", ["participant", "site"])
def test_make_splits_keeps_each_group_in_one_fold(by: str) -> None:
    y, pid, site = _two_runs_each()
    groups = pid if by == "participant" else site
    folds, repeats = (5, 3) if by == "participant" else (3, 2)
    splits = make_splits(y, groups, folds, repeats, seed=11)
    assert [(r, f) for r, f, _, _ in splits] == [(r, f) for r in range(repeats)
                                                 for f in range(folds)]
    for repeat in range(repeats):
        tests = [test for r, _, _, test in splits if r == repeat]
        # Each repeat's test folds partition the runs ...
        assert sorted(np.concatenate(tests)) == list(range(len(y)))
        for r, _, train, test in splits:
            if r != repeat:
                continue
            assert not set(train) & set(test)
            assert len(train) + len(test) == len(y)
            # ... no group (participant, or site) is in training and test at once ...
            assert not set(groups[train]) & set(groups[test])
            # ... so both runs of a participant are on the same side.
            assert not set(pid[train]) & set(pid[test])
            assert set(y[test]) == {"adhd", "control"}
    if by == "site":
        return
    # Repeats reshuffle the folds.
    first = [frozenset(pid[t]) for r, _, _, t in splits if r == 0]
    second = [frozenset(pid[t]) for r, _, _, t in splits if r == 1]
    assert set(first) != set(second)


# --- statistics -----------------------------------------------------------------------------------

def test_corrected_ttest_is_nadeau_bengio() -> None:
    diff = np.array([0.1, 0.2, 0.3, 0.4])
    n_train, n_test = 30, 10
    # By hand: mean 0.25, sample variance (0.15^2 + 0.05^2 + 0.05^2 + 0.15^2) / 3 = 0.05 / 3,
    # t = mean / sqrt((1/k + n_test/n_train) * var) with k = 4 folds, k - 1 degrees of freedom.
    t_hand = 0.25 / math.sqrt((1 / 4 + 10 / 30) * (0.05 / 3))
    assert t_hand == pytest.approx(2.535463, abs=1e-6)
    t, p = corrected_ttest(diff, n_train, n_test)
    assert t == pytest.approx(t_hand, rel=1e-12)
    assert p == pytest.approx(2 * stats.t.sf(t_hand, df=3), rel=1e-12)
    assert 0.05 < p < 0.1
    # The correction widens the naive paired t-test (which ignores overlapping training sets).
    naive = stats.ttest_1samp(diff, 0.0)
    assert abs(t) < abs(naive.statistic) and p > naive.pvalue
    # Sign: a worse first model gives the mirrored statistic.
    assert corrected_ttest(-diff, n_train, n_test) == pytest.approx((-t, p))


def test_corrected_ttest_degenerate_differences() -> None:
    t, p = corrected_ttest(np.zeros(5), 40, 10)
    assert np.isnan(t) and np.isnan(p)
    assert corrected_ttest(np.full(5, 0.1), 40, 10) == (np.inf, 0.0)


def test_fold_metrics_on_a_hand_example() -> None:
    classes = np.array(["adhd", "control"])
    y_true = np.array(["control", "control", "control", "control", "adhd", "adhd"])
    y_pred = np.array(["control", "control", "control", "adhd", "adhd", "control"])
    p_control = np.array([0.9, 0.8, 0.6, 0.4, 0.3, 0.7])
    proba = np.column_stack([1 - p_control, p_control])
    m = fold_metrics(y_true, y_pred, proba, classes)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Recalls: control 3/4, adhd 1/2.
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    # Control (classes[1]) is the positive class; of the 4 x 2 (control, adhd) pairs, 6 are ranked
    # right (adhd 0.3 below all four controls, adhd 0.7 below 0.9 and 0.8).
    assert m["roc_auc"] == pytest.approx(6 / 8)
    # F1: control precision 3/4, recall 3/4 -> 3/4; adhd precision 1/2, recall 1/2 -> 1/2.
    assert m["f1_macro"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    # A test fold with a single class has no AUC.
    single = fold_metrics(y_true[:4], y_pred[:4], proba[:4], classes)
    assert np.isnan(single["roc_auc"]) and single["accuracy"] == pytest.approx(3 / 4)


# --- read_targets -------------------------------------------------------------------------------------

@pytest.fixture
def roimae_records(caplog: pytest.LogCaptureFixture,
                   monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """caplog for the ``roimae`` logger, which does not propagate once logging is set up.

    For the test, the logger's only handler is caplog's (restored afterwards).
    """
    logger = get_logger()
    monkeypatch.setattr(logger, "handlers", [caplog.handler])
    monkeypatch.setattr(logger, "propagate", False)
    caplog.set_level(logging.DEBUG, logger="roimae")
    return caplog


ADHD200_MAP = {"0": "control", "1": "adhd", "2": "adhd", "3": "adhd"}


def test_read_targets_recodes_and_drops_missing(tmp_path: Path, roimae_records) -> None:
    # ADHD-200 phenotypes code DX as 0 (control) and 1/2/3 (ADHD subtypes); n/a is missing.
    tsv = tmp_path / "participants.tsv"
    tsv.write_text("participant_id\tDX\tsite\n"
                   "sub-01\t0\tNYU\nsub-02\t1\tNYU\nsub-03\tn/a\tPeking\nsub-04\t3\tPeking\n"
                   "sub-05\t2\tOHSU\nsub-06\t\tOHSU\nsub-07\t0\tOHSU\n")
    participants = read_participants(tsv)
    roimae_records.clear()
    targets = read_targets(participants, "DX", ADHD200_MAP)
    assert targets.to_dict() == {"sub-01": "control", "sub-02": "adhd", "sub-04": "adhd",
                                 "sub-05": "adhd", "sub-07": "control"}
    warnings = [r.getMessage() for r in roimae_records.records if r.levelno == logging.WARNING]
    assert warnings == ["2 participants have no DX value and are left out"]
    # Without a map the values are kept as written (strings), stripped.
    assert read_targets(participants, "site", {}).to_dict()["sub-03"] == "Peking"
    assert set(read_targets(participants, "DX", {})) == {"0", "1", "2", "3"}


def test_read_targets_missing_column_or_table_is_bad_data() -> None:
    participants = pd.DataFrame({"participant_id": ["sub-01"], "diagnosis": ["adhd"]})
    with pytest.raises(BadDataError, match=r"no column 'DX'.*diagnosis") as info:
        read_targets(participants, "DX", {})
    assert info.value.exit_code == ExitCode.BAD_DATA == 65
    with pytest.raises(BadDataError, match=r"participants\.tsv"):
        read_targets(None, "diagnosis", {})


# --- the group level through the command line, on fake participant outputs ------------------------------

@pytest.fixture(scope="module")
def atlas(atlas_dir: Path) -> Atlas:
    return load_atlas(atlas_dir / "AAL3v1_2mm.nii.gz", atlas_dir / "AAL3v1_labels.tsv")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, atlas: Atlas) -> Path:
    """A 20-participant demo (balanced diagnoses, two sites); BOLD content is never read here."""
    root = tmp_path_factory.mktemp("group") / "demo"
    make_demo_dataset(root, n_participants=N_PARTICIPANTS, n_frames=2, seed=0, atlas=atlas)
    return root


def write_fake_outputs(bids: Path, out: Path, atlas: Atlas, *, shift: float = 2.5,
                       occluded: bool = False, desc: str = "roi", seed: int = 0,
                       model: str = "0" * 64, complete: bool = True) -> None:
    """Write participant-level outputs of every run of ``bids`` into ``out``.

    Parameters
    ----------
    bids, out : Path
        The input dataset and the output directory of the (pretend) participant level.
    atlas : Atlas
        The atlas the group level will load (for the occluded-embedding rows and file names).
    shift : float
        Planted difference: the first three embedding dimensions are ``+shift`` for adhd and
        ``-shift`` for control, on unit-variance noise.
    occluded : bool
        Also write occluded embeddings: every region leaves the embedding unchanged except
        :data:`KEY_REGION`, whose occlusion removes the planted difference, and
        :data:`HIDDEN_REGION`, which has no value (``n/a``, a region the model cannot hide).
    desc, seed : str, int
        Model description of the file names; seed of the noise.
    model : str
        The model hash the completion sidecars name.
    complete : bool
        Write each run's completion sidecar (the participant level writes it last).
    """
    config = config_from_args(build_parser().parse_args([str(bids), str(out), "group"]))
    dataset = discover_runs(config)
    writer = DerivativesWriter(out, source_datasets=dataset.datasets)
    diagnosis = dataset.participants.set_index("participant_id")["diagnosis"]
    names = atlas.table()["name"].tolist()
    rng = np.random.default_rng(seed)
    columns = [f"e{i:03d}" for i in range(N_DIMS)]
    for run in dataset.runs:
        pid = f"sub-{run.subject}"
        sign = 1.0 if diagnosis[pid] == "adhd" else -1.0
        embedding = rng.normal(size=N_DIMS)
        embedding[:3] += sign * shift
        paths = RunOutputs(writer, run, desc, atlas_label(atlas))
        paths.mean_embedding.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([embedding], columns=columns).to_csv(paths.mean_embedding, sep="\t",
                                                          index=False)
        pd.DataFrame([embedding], columns=columns).to_csv(paths.embedding, sep="\t", index=False)
        if complete:
            paths.done.write_text(json.dumps({"Model": {"SHA256": model},
                                              "Attribution": {} if occluded else None}))
        if occluded:
            # The region table (measures unknown here) and placeholder maps (not read).
            regions = atlas.table().assign(reconerror=np.nan, occlusion=np.nan)
            regions.to_csv(paths.table, sep="\t", index=False, na_rep="n/a")
            regions.head(1).to_csv(paths.groups, sep="\t", index=False, na_rep="n/a")
            paths.recon_map.touch()
            paths.occlusion_map.touch()
            rows = np.tile(embedding, (len(names), 1))
            rows[names.index(KEY_REGION), :3] -= sign * shift
            rows[names.index(HIDDEN_REGION)] = np.nan
            table = pd.DataFrame(rows, columns=columns)
            table.insert(0, "name", names)
            table.insert(0, "index", atlas.table()["index"].to_numpy())
            table.to_csv(paths.occluded, sep="\t", index=False, na_rep="n/a")


def run_group(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``roimae BIDS OUT group ...`` in-process; returns (exit code, stderr).

    BLAS is limited to one thread: on small shared machines multithreaded OpenBLAS makes each
    tiny logistic-regression fit ~30x slower.
    """
    # Drop what came before (the fake outputs' discovery logs through the handler a previous
    # test's main() set up, whose captured stream is closed by now).
    capsys.readouterr()
    with threadpool_limits(limits=1, user_api="blas"):
        code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _group_file(out: Path, name: str) -> Path:
    return out / "group" / name


def test_group_level_finds_planted_difference_and_region(demo: Path, tmp_path: Path, atlas: Atlas,
                                                         capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas, occluded=True)
    # What a group job killed while writing leaves behind: removed by the next one.
    stale = [out / "group" / ".target-diagnosis_desc-roi_feature-global_folds.k1ll3d.tmp.tsv",
             out / "group" / "figures" / ".target-diagnosis_roc.k1ll3d.tmp.png",
             out / ".group_target-diagnosis.k1ll3d.tmp.html"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--n-permutations", "20",
                           "--cv-repeats", "2", "--features", "global"], capsys)
    assert code == 0, err
    assert not any(path.exists() for path in stale)
    metrics = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_metrics.tsv"), sep="\t",
                          na_values="n/a").set_index("metric")
    assert metrics.loc["balanced_accuracy", "mean"] > 0.8
    # 20 permutations: the smallest possible p is 1/21.
    assert metrics.loc["balanced_accuracy", "permutation_p"] == pytest.approx(1 / 21)
    assert metrics.loc["roc_auc", "mean"] > 0.9
    folds = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_folds.tsv"), sep="\t")
    assert len(folds) == 2 * 5 and set(folds["n_test"] + folds["n_train"]) == {N_PARTICIPANTS}
    predictions = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_predictions.tsv"),
                              sep="\t")
    # Every participant is tested exactly once per repeat.
    assert (predictions.groupby("repeat")["participant_id"].value_counts() == 1).all()
    assert predictions["participant_id"].nunique() == N_PARTICIPANTS
    confusion = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_"
                                             "confusion.tsv"), sep="\t")
    assert confusion["true"].tolist() == ["adhd", "control"]
    assert confusion[["adhd", "control"]].to_numpy().sum() == 2 * N_PARTICIPANTS
    settings = json.loads(_group_file(out, "target-diagnosis_settings.json").read_text())
    assert settings["classes"] == ["adhd", "control"]
    assert settings["cv_groups"] == "participant_id" and settings["sets"] == ["roi-global"]
    assert (out / "group_target-diagnosis.html").is_file()
    # Region importance: only the planted region matters; the unhideable one has no value.
    attribution = pd.read_csv(
        _group_file(out, "target-diagnosis_atlas-AAL3v1_desc-roi_feature-global_attribution.tsv"), sep="\t",
        na_values="n/a").set_index("name")
    importance = attribution["importance"]
    assert importance.idxmax() == KEY_REGION and importance[KEY_REGION] > 0.1
    assert np.isnan(importance[HIDDEN_REGION])
    others = importance.drop([KEY_REGION, HIDDEN_REGION])
    assert np.allclose(others, 0.0, atol=1e-9)
    assert _group_file(out, "target-diagnosis_atlas-AAL3v1_desc-roi_feature-global_stat-importance_boldmap"
                            ".nii.gz").is_file()


def test_group_level_without_occluded_embeddings_has_no_importance(demo: Path, tmp_path: Path,
                                                                   atlas: Atlas, capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas, occluded=False)
    # An earlier group run of the same target (another model, maps with attribution) and one of
    # another target: the first one's outputs go, the second one's stay.
    stale = [out / "group/target-diagnosis_desc-random_metrics.tsv",
             out / "group/target-diagnosis_atlas-AAL3v1_desc-roi_stat-importance_boldmap.nii.gz",
             out / "group/target-diagnosis_atlas-AAL3v1_desc-roi_feature-global_stat-reconerror_"
                   "boldmap.nii.gz",
             out / "group/figures/target-diagnosis_desc-random_confusion.png"]
    other = out / "group/target-site_desc-roi_metrics.tsv"
    other_report = out / "group_target-site.html"
    for path in [*stale, other, other_report, out / "group_target-diagnosis.html"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("old\n")
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--n-permutations", "0",
                           "--cv-repeats", "1", "--features", "global"], capsys)
    assert code == 0, err
    assert not any(path.exists() for path in stale) and other.is_file()
    # One report per target: the other target's report is never replaced.
    assert other_report.read_text() == "old\n"
    assert "roi-global" in (out / "group_target-diagnosis.html").read_text()
    # Said in the log and the report, not an empty heading.
    assert "region importance not computed for roi-global: no run has region attribution" in err
    assert "--no-attribution" in (out / "group_target-diagnosis.html").read_text()
    # The completion marker is written last.
    marker = _group_file(out, "target-diagnosis_settings.json")
    outputs = [p for p in (out / "group").rglob("target-diagnosis_*") if p != marker]
    assert outputs and all(p.stat().st_mtime_ns <= marker.stat().st_mtime_ns for p in outputs)
    assert json.loads(marker.read_text())["models"] == {"roi-global": "0" * 64}
    attribution = pd.read_csv(_group_file(out, "target-diagnosis_atlas-AAL3v1_desc-roi_feature-global_"
                                               "attribution.tsv"), sep="\t", na_values="n/a")
    assert len(attribution) == len(atlas.regions)
    assert attribution[["importance", "importance_se", "reconerror", "occlusion"]].isna().all().all()
    assert not list((out / "group").glob("*_boldmap.nii.gz"))
    metrics = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_metrics.tsv"), sep="\t",
                          na_values="n/a").set_index("metric")
    assert metrics.loc["balanced_accuracy", "mean"] > 0.8
    assert np.isnan(metrics.loc["balanced_accuracy", "permutation_p"])   # --n-permutations 0


def test_group_level_cv_groups_keeps_each_site_out_of_training(demo: Path, tmp_path: Path,
                                                               atlas: Atlas, capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas)
    # Two sites, so two folds: leave-one-site-out.
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--cv-groups", "site",
                           "--cv-folds", "2", "--cv-repeats", "1", "--n-permutations", "0",
                           "--features", "global"], capsys)
    assert code == 0, err
    site = pd.read_csv(demo / "participants.tsv", sep="\t").set_index("participant_id")["site"]
    predictions = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_predictions.tsv"),
                              sep="\t")
    test_sites = predictions.groupby("fold")["participant_id"].agg(lambda p: set(site[p]))
    assert sorted(map(sorted, test_sites)) == [["siteA"], ["siteB"]]
    folds = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_folds.tsv"), sep="\t")
    assert folds["n_test"].tolist() == [(site == s).sum() for s in
                                        [next(iter(t)) for t in test_sites]]
    settings = json.loads(_group_file(out, "target-diagnosis_settings.json").read_text())
    assert settings["cv_groups"] == "site"


def test_group_level_uses_only_complete_runs(demo: Path, tmp_path: Path, atlas: Atlas,
                                            capsys) -> None:
    """Runs whose participant job died (no completion sidecar) are left out, and said so."""
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas)
    for sub in ("01", "02"):
        next((out / f"sub-{sub}").rglob("*_desc-roi_embedding.json")).unlink()
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--n-permutations", "0",
                           "--cv-repeats", "1", "--features", "global"], capsys)
    assert code == 0, err
    assert "roi-global: 2 selected runs have no complete global features" in err
    predictions = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_"
                                               "predictions.tsv"), sep="\t")
    assert predictions["participant_id"].nunique() == N_PARTICIPANTS - 2
    assert not {"sub-01", "sub-02"} & set(predictions["participant_id"])


def test_runs_written_before_a_readout_existed_say_how_to_get_it(demo: Path, tmp_path: Path,
                                                                 atlas: Atlas, capsys) -> None:
    """Complete runs of an earlier roimae lack the subregion files: rerun, not "run first"."""
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas)
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--n-permutations", "0",
                           "--cv-repeats", "1", "--features", "subregion"], capsys)
    assert code == 66, err
    assert "no desc-roi run has subregion features (written by an earlier roimae" in err
    assert "--overwrite" in err and "Traceback" not in err


@pytest.fixture
def demo_copy(demo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "demo"
    shutil.copytree(demo, copy)
    return copy


def test_group_level_refuses_a_non_finite_run_embedding(demo: Path, tmp_path: Path, atlas: Atlas,
                                                        capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas)
    first = sorted(out.glob("sub-*/func/*_desc-roi_stat-mean_embedding.tsv"))[0]
    table = pd.read_csv(first, sep="\t")
    table.iloc[0, 2] = np.inf
    table.to_csv(first, sep="\t", index=False)
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--features", "global",
                           "--n-permutations", "0"], capsys)
    assert code == 65 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"roimae: error: {first.name} holds non-finite values; rerun "
                                    "the participant level for it (--overwrite) with a sound model")
    assert not (out / "group").exists() and not list(out.glob("group*.html"))


def test_runs_without_a_participants_row_are_left_out_with_a_warning(
        demo_copy: Path, tmp_path: Path, atlas: Atlas, capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo_copy, out, atlas)
    tsv = demo_copy / "participants.tsv"
    table = pd.read_csv(tsv, sep="\t")
    table[table["participant_id"] != "sub-03"].to_csv(tsv, sep="\t", index=False)
    code, err = run_group([demo_copy, out, "group", "--target", "diagnosis", "--features",
                           "global", "--n-permutations", "0", "--cv-repeats", "1"], capsys)
    assert code == 0, err
    assert "runs left out, without a row in participants.tsv: 1 (sub-03_" in err
    predictions = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_"
                                               "predictions.tsv"), sep="\t")
    assert set(predictions["participant_id"]) == set(table["participant_id"]) - {"sub-03"}


@pytest.mark.parametrize(("case", "options", "message"), [
    ("no column", ["--target", "DX"], "participants.tsv has no column 'DX'"),
    ("no cv column", ["--target", "diagnosis", "--cv-groups", "scanner"],
     "no column 'scanner' (--cv-groups)"),
    ("single class", ["--target", "diagnosis"], "the target has a single class ('control')"),
    ("too few", ["--target", "diagnosis", "--participant-label", "01", "02", "03", "04", "05",
                 "06"], "too few participants for 5-fold cross-validation"),
    ("site is diagnosis", ["--target", "diagnosis", "--cv-groups", "site", "--cv-folds", "2"],
     "a cross-validation fold has a single class"),
])
def test_group_level_input_errors_exit_65(demo_copy: Path, tmp_path: Path, atlas: Atlas, capsys,
                                          case: str, options: list[str], message: str) -> None:
    tsv = demo_copy / "participants.tsv"
    table = pd.read_csv(tsv, sep="\t")
    if case == "single class":
        table["diagnosis"] = "control"
    elif case == "site is diagnosis":   # each site holds one class: leave-one-site-out cannot learn
        table["site"] = table["diagnosis"].map({"adhd": "siteA", "control": "siteB"})
    table.to_csv(tsv, sep="\t", index=False)
    out = tmp_path / "out"
    write_fake_outputs(demo_copy, out, atlas)
    code, err = run_group([demo_copy, out, "group", *options, "--features", "global"], capsys)
    assert code == 65
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("roimae: error: ")
    assert message in err.splitlines()[-1]
    # Nothing of the group level was written.
    assert not (out / "group").exists() and not list(out.glob("group*.html"))


# --- readouts and baselines -------------------------------------------------------------------------

def write_fake_connectivity(bids: Path, out: Path, atlas: Atlas, *, desc: str = "roi",
                            seed: int = 1) -> None:
    """Model and baseline connectivity matrices of every run: only the model's carry the class.

    In the model's matrix, the connections of KEY_REGION with the first 30 regions are +0.4
    (adhd) or -0.4 (control) on noise of SD 0.1 (a hub whose coupling differs); the baseline's
    (``fc``) is noise alone.
    """
    config = config_from_args(build_parser().parse_args([str(bids), str(out), "group"]))
    dataset = discover_runs(config)
    writer = DerivativesWriter(out, source_datasets=dataset.datasets)
    diagnosis = dataset.participants.set_index("participant_id")["diagnosis"]
    names = atlas.table()["name"].tolist()
    key = names.index(KEY_REGION)
    partners = [r for r in range(30) if r != key]
    rng = np.random.default_rng(seed)

    def relmat(planted: float) -> pd.DataFrame:
        noise = rng.normal(0, 0.1, size=(len(names), len(names)))
        matrix = np.clip((noise + noise.T) / np.sqrt(2), -0.9, 0.9)
        matrix[key, partners] += planted
        matrix[partners, key] += planted
        np.fill_diagonal(matrix, 1.0)
        frame = pd.DataFrame(matrix, columns=names)
        frame.insert(0, "Node", names)
        return frame

    for run in dataset.runs:
        sign = 1.0 if diagnosis[f"sub-{run.subject}"] == "adhd" else -1.0
        paths = RunOutputs(writer, run, desc, atlas_label(atlas))
        paths.connectivity.parent.mkdir(parents=True, exist_ok=True)
        relmat(0.4 * sign).to_csv(paths.connectivity, sep="\t", index=False)
        relmat(0.0).to_csv(paths.fc, sep="\t", index=False)


def test_connectivity_readout_beside_baselines_on_identical_folds(demo: Path, tmp_path: Path,
                                                                  atlas: Atlas, capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas, shift=0.0)
    write_fake_connectivity(demo, out, atlas)
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--covariates", "age",
                           "site", "--n-permutations", "10", "--cv-repeats", "1"], capsys)
    assert code == 0, err
    scores = pd.read_csv(_group_file(out, "target-diagnosis_scores.tsv"), sep="\t",
                         na_values="n/a").set_index("set")
    # Default: every model found, with the connectivity readout, fc, and the covariates.
    assert scores.index.tolist() == ["roi-connectivity", "fc", "covariates"]
    n_regions = len(atlas.regions)
    assert scores.loc["roi-connectivity", "features"] == n_regions * (n_regions - 1) // 2
    assert scores.loc["roi-connectivity", "balanced_accuracy"] > 0.85
    assert scores.loc["roi-connectivity", "permutation_p"] == pytest.approx(1 / 11)
    assert scores.loc["fc", "permutation_p"] > 0.05  # noise: no better than permuted labels
    # age + one-hot site: 3 columns.
    assert scores.loc["covariates", "features"] == 3
    best = scores.loc[["fc", "covariates"], "balanced_accuracy"].idxmax()
    assert (scores["best_baseline"] == best).all()
    model = scores.loc["roi-connectivity"]
    assert model["difference"] == pytest.approx(model["balanced_accuracy"]
                                                 - scores.loc[best, "balanced_accuracy"])
    assert model["difference"] > 0 and model["t"] > 0 and 0 < model["p_corrected"] < 1
    # Every set was scored on the same folds.
    folds = [pd.read_csv(_group_file(out, f"target-diagnosis_{stem}_folds.tsv"), sep="\t")
             for stem in ("desc-roi_feature-connectivity", "feature-fc", "feature-covariates")]
    assert all(f[["repeat", "fold", "n_train", "n_test"]].equals(folds[0][["repeat", "fold",
                                                                            "n_train", "n_test"]])
               for f in folds)
    # Importance through the connectivity features: the hub of the planted connections first.
    attribution = pd.read_csv(_group_file(out, "target-diagnosis_atlas-AAL3v1_desc-roi_feature-"
                                               "connectivity_attribution.tsv"), sep="\t",
                              na_values="n/a").set_index("name")
    importance = attribution["importance"]
    assert importance.idxmax() == KEY_REGION
    assert importance[KEY_REGION] > 5 * importance.drop(KEY_REGION).abs().max()
    comparison = pd.read_csv(_group_file(out, "target-diagnosis_comparison.tsv"), sep="\t")
    assert len(comparison) == 3  # every pair
    report = (out / "group_target-diagnosis.html").read_text()
    assert "Models and baselines" in report and "roi-connectivity" in report


def write_fake_timeseries(bids: Path, out: Path, atlas: Atlas, *, seed: int = 2,
                          frames: int = 120) -> list[str]:
    """Baseline region time series (and their Pearson relmats) of every run; the regions used.

    Twenty regions have a signal (noise of SD 1), the others none (NaN, as a region without
    voxels): the tangent space needs fewer regions than training runs (docs/science.md). In adhd
    runs the first 10 of them follow KEY_REGION (a hub: partner = noise + 0.6 KEY_REGION), in
    control runs they are independent.
    """
    config = config_from_args(build_parser().parse_args([str(bids), str(out), "group"]))
    dataset = discover_runs(config)
    writer = DerivativesWriter(out, source_datasets=dataset.datasets)
    diagnosis = dataset.participants.set_index("participant_id")["diagnosis"]
    names = atlas.table()["name"].tolist()
    key = names.index(KEY_REGION)
    used = [*[r for r in range(20) if r != key][:19], key]
    partners = used[:10]
    rng = np.random.default_rng(seed)
    for run in dataset.runs:
        ts = np.full((frames, len(names)), np.nan)
        ts[:, used] = rng.normal(size=(frames, len(used)))
        if diagnosis[f"sub-{run.subject}"] == "adhd":
            ts[:, partners] += 0.6 * ts[:, [key]]
        paths = RunOutputs(writer, run, "roi", atlas_label(atlas))
        paths.timeseries.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(ts, columns=names).to_csv(paths.timeseries, sep="\t", index=False,
                                               na_rep="n/a")
        relmat = pd.DataFrame(pd.DataFrame(ts).corr().to_numpy(), columns=names)
        relmat.insert(0, "Node", names)
        relmat.to_csv(paths.fc, sep="\t", index=False, na_rep="n/a")
    return [names[r] for r in used]


def test_tangent_baseline_finds_a_planted_coupling(demo: Path, tmp_path: Path, atlas: Atlas,
                                                   capsys) -> None:
    out = tmp_path / "out"
    used = write_fake_timeseries(demo, out, atlas)
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--compare", "fc",
                           "tangent", "--n-permutations", "10", "--cv-repeats", "1"], capsys)
    assert code == 0, err
    scores = pd.read_csv(_group_file(out, "target-diagnosis_scores.tsv"), sep="\t",
                         na_values="n/a").set_index("set")
    assert scores.index.tolist() == ["fc", "tangent"]
    # The regions without signal are left out of the tangent space.
    assert scores.loc["tangent", "features"] == 20 * 19 // 2
    assert scores.loc["tangent", "balanced_accuracy"] > 0.85
    assert scores.loc["tangent", "permutation_p"] == pytest.approx(1 / 11)
    # Importance through the tangent features: the hub and its partners above every other
    # region; none for the regions left out.
    attribution = pd.read_csv(_group_file(out, "target-diagnosis_atlas-AAL3v1_feature-tangent_"
                                               "attribution.tsv"), sep="\t",
                              na_values="n/a").set_index("name")
    importance = attribution["importance"]
    planted = [*used[:10], KEY_REGION]
    assert set(importance.nlargest(3).index) <= set(planted)
    # Diffuse, though: whitening by the reference spreads the planted change over every edge.
    assert importance[planted].mean() > importance[used[10:-1]].mean()
    assert importance.drop(used).isna().all()


def test_tangent_reference_is_fit_on_the_training_runs_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    es = _synthetic_set(n=24)
    X = np.empty(len(es.runs), dtype=object)
    X[:] = [rng.normal(size=(50, 8)) for _ in range(len(es.runs))]
    es = EmbeddingSet("tangent", "feature-tangent", None, "tangent", es.runs, X)
    assert es.n_features == 28 and es.feature_matrix().shape == (24, 28)
    y = es.runs["target"].to_numpy()
    splits = make_splits(y, es.runs["cv_group"].to_numpy(), 4, 1, seed=0)
    with threadpool_limits(limits=1):
        _, _, models, _ = evaluate(es, splits, np.array(["adhd", "control"]),
                                   _group_config(tmp_path))
    for (_, _, train, _), (_, _, model) in zip(splits, models, strict=True):
        fitted = model.best_estimator_.named_steps["connectivity"]
        np.testing.assert_allclose(fitted.mean_, tangent_space().fit(list(X[train])).mean_)


def test_covariates_baseline_needs_its_columns(demo: Path, tmp_path: Path, atlas: Atlas,
                                               capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas)
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--compare", "roi",
                           "covariates", "--features", "global"], capsys)
    assert code == 64 and "--covariates" in err.splitlines()[-1]
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--features", "global",
                           "--covariates", "height"], capsys)
    assert code == 65 and "no column 'height'" in err.splitlines()[-1]


def _synthetic_set(n: int = 24, features: int = 300, seed: int = 0) -> EmbeddingSet:
    rng = np.random.default_rng(seed)
    y = np.where(np.arange(n) % 2 == 0, "adhd", "control")
    X = rng.normal(size=(n, features))
    X[y == "adhd", :5] += 2.0
    X[rng.random(X.shape) < 0.02] = np.nan  # a few missing values, imputed in the folds
    runs = pd.DataFrame({"run": [f"r{i}" for i in range(n)],
                         "participant_id": [f"sub-{i:02d}" for i in range(n)], "target": y,
                         "cv_group": [f"sub-{i:02d}" for i in range(n)], "table": None,
                         "occluded": None})
    return EmbeddingSet("roi-region", "desc-roi_feature-region", "roi", "region", runs, X)


def _group_config(tmp_path: Path, **group) -> Config:
    return Config(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="group",
                  work_dir=tmp_path / "work", group={"target": "diagnosis", **group})


def test_feature_reduction_is_fit_on_training_folds_only(tmp_path: Path) -> None:
    es = _synthetic_set(n=40)
    y = es.runs["target"].to_numpy()
    splits = make_splits(y, es.runs["cv_group"].to_numpy(), 4, 1, seed=0)
    classes = np.array(["adhd", "control"])
    with threadpool_limits(limits=1):
        folds, _, models, _ = evaluate(es, splits, classes, _group_config(tmp_path))
        # The first fold's test rows do not change what that fold learned: make them absurd.
        poisoned = _synthetic_set(n=40)
        poisoned.X[splits[0][3]] = 1e6
        _, _, poisoned_models, _ = evaluate(poisoned, splits, classes, _group_config(tmp_path))
    for (_, _, train, _), (_, _, model) in zip(splits, models, strict=True):
        pipeline = model.best_estimator_
        imputed = pipeline.named_steps["impute"].transform(es.X[train])
        np.testing.assert_allclose(pipeline.named_steps["scale"].mean_, imputed.mean(0))
        # PCA keeps every component of the training rows (a rotation onto their span).
        assert pipeline.named_steps["reduce"].n_components_ == len(train)
    clean, poisoned_first = models[0][2].best_estimator_, poisoned_models[0][2].best_estimator_
    for step in ("impute", "scale"):
        np.testing.assert_array_equal(getattr(poisoned_first.named_steps[step],
                                              "statistics_" if step == "impute" else "mean_"),
                                      getattr(clean.named_steps[step],
                                              "statistics_" if step == "impute" else "mean_"))
    np.testing.assert_allclose(poisoned_first.named_steps["clf"].coef_,
                               clean.named_steps["clf"].coef_)
    assert folds["balanced_accuracy"].mean() > 0.7


def test_pca_rotation_changes_no_prediction_of_the_linear_probe() -> None:
    # An L2-penalised logistic regression on all principal components of the training rows
    # predicts exactly as on the standardised features (the penalty is rotation invariant).
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    es = _synthetic_set(features=80)
    X = np.nan_to_num(es.X)
    y = es.runs["target"].to_numpy()
    train, test = np.arange(16), np.arange(16, 24)
    plain = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, tol=1e-10, max_iter=10000))
    rotated = make_pipeline(StandardScaler(), PCA(svd_solver="full"),
                            LogisticRegression(C=0.1, tol=1e-10, max_iter=10000))
    plain.fit(X[train], y[train])
    rotated.fit(X[train], y[train])
    np.testing.assert_allclose(rotated.decision_function(X[test]), plain.decision_function(X[test]),
                               atol=1e-5)


def test_permutation_null_reuses_label_free_steps_exactly(tmp_path: Path) -> None:
    # The permutation test fits imputation, scaling and PCA once per fold; refitting the whole
    # pipeline for every permutation gives the same null distribution.
    from sklearn.base import clone
    from sklearn.metrics import balanced_accuracy_score

    es = _synthetic_set(n=20, features=50)
    y = es.runs["target"].to_numpy()
    splits = make_splits(y, es.runs["cv_group"].to_numpy(), 4, 1, seed=0)
    config = _group_config(tmp_path, n_permutations=5)
    with threadpool_limits(limits=1):
        folds, _, _, _ = evaluate(es, splits, np.array(["adhd", "control"]), config)
        _, null = permutation_pvalue(es, splits, folds, config)
    from bidsapp.classification import build_classifier

    params = json.loads(folds["selected"].value_counts().index[0])
    base = build_classifier("logreg", 0, 2).estimator.set_params(
        **{f"clf__{k}": v for k, v in params.items()})
    rng = np.random.default_rng(config.random_seed)
    labels = y  # one run per participant, in participant order
    for expected in null:
        y_perm = rng.permutation(labels)
        scores = [balanced_accuracy_score(y_perm[test], clone(base).fit(es.X[train], y_perm[train])
                                          .predict(es.X[test]))
                  for _, _, train, test in splits]
        assert np.mean(scores) == pytest.approx(expected)


def test_effective_rank_counts_the_directions_used() -> None:
    rng = np.random.default_rng(0)
    one = np.outer(rng.normal(size=30), rng.normal(size=10)) + 5.0  # one direction + a constant
    assert effective_rank(one) == pytest.approx(1.0)
    centred = rng.normal(size=(30, 10))
    centred -= centred.mean(0)
    even = np.linalg.qr(centred)[0] * 3 + 1.0  # 10 orthogonal directions of equal variance
    assert effective_rank(even) == pytest.approx(10.0)


# --- small designs (issue #13, item 10) -------------------------------------------------------------

#: A console log record, as bidsapp.logs formats them: anything else on stderr is a stray warning.
_CONSOLE_RECORD = r"^\d\d:\d\d:\d\d \[(DEBUG|INFO|WARNING|ERROR)\] "


def test_four_participants_two_folds_runs_with_warnings_in_the_log(tmp_path: Path, atlas: Atlas,
                                                                    capsys) -> None:
    """2 adhd + 2 control, 2 folds: one participant per class in training, no inner CV possible."""
    import re

    bids, out = tmp_path / "demo", tmp_path / "out"
    make_demo_dataset(bids, n_participants=4, n_frames=2, seed=0, atlas=atlas)
    write_fake_outputs(bids, out, atlas, occluded=True)
    code, err = run_group([bids, out, "group", "--target", "diagnosis", "--cv-folds", "2",
                           "--cv-repeats", "2", "--n-permutations", "20", "--features", "global"],
                          capsys)
    assert code == 0, err[-3000:]
    stray = [line for line in err.splitlines() if not re.match(_CONSOLE_RECORD, line)]
    assert stray == []
    assert "too few for an inner cross-validation" in err
    folds = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_folds.tsv"),
                        sep="\t")
    assert len(folds) == 4 and (folds["n_train"] == 2).all()
    assert set(folds["selected"]) == {json.dumps({"C": 1.0})}   # LogisticRegression's default


def test_inner_cv_is_stratified_by_class(tmp_path: Path) -> None:
    from bidsapp.classification import inner_cv

    y = np.repeat(["adhd", "control"], [3, 9])
    groups = np.array([f"sub-{i:02d}" for i in range(12)])
    cv, fixed = inner_cv(y, groups, seed=0)
    assert not fixed and cv.get_n_splits() == 3
    for train, test in cv.split(np.zeros(12), y, groups):
        assert set(y[train]) == set(y[test]) == {"adhd", "control"}
    cv, fixed = inner_cv(np.array(["a", "b", "b"]), np.array(["1", "2", "3"]), seed=0)
    assert fixed and len(cv) == 1


def test_fewer_cv_groups_than_folds_falls_back_to_leave_one_group_out(
        demo: Path, tmp_path: Path, atlas: Atlas, capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas)
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--cv-groups", "site",
                           "--n-permutations", "0", "--features", "global"], capsys)  # 2 sites
    assert code == 0, err[-3000:]
    assert "only 2 cross-validation groups for 5 folds: using leave-one-group-out" in err
    folds = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_feature-global_folds.tsv"),
                        sep="\t")
    assert folds[["repeat", "fold"]].values.tolist() == [[0, 0], [0, 1]]


def test_non_ascii_target_names_stay_out_of_file_names(demo_copy: Path, tmp_path: Path,
                                                       atlas: Atlas, capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo_copy, out, atlas)
    tsv = demo_copy / "participants.tsv"
    pd.read_csv(tsv, sep="\t").rename(columns={"diagnosis": "診断"}).to_csv(tsv, sep="\t",
                                                                           index=False)
    code, err = run_group([demo_copy, out, "group", "--target", "診断", "--cv-repeats", "1",
                           "--n-permutations", "0", "--features", "global"], capsys)
    assert code == 0, err[-3000:]
    names = [p.name for p in (out / "group").rglob("*") if p.is_file()]
    assert names and all(name.isascii() for name in names), names
    settings = next((out / "group").glob("target-*_settings.json"))
    assert json.loads(settings.read_text())["target"] == "診断"


def test_each_target_keeps_its_own_maps(demo: Path, tmp_path: Path, atlas: Atlas, capsys) -> None:
    """Group maps carry the target's prefix and a sidecar: another target never replaces them."""
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas, occluded=True)
    rng = np.random.default_rng(3)
    for table in out.rglob("*_desc-roi_attribution.tsv"):
        regions = pd.read_csv(table, sep="\t", na_values="n/a")
        regions.assign(reconerror=rng.uniform(size=len(regions))).to_csv(
            table, sep="\t", index=False, na_rep="n/a")
    for target in ("diagnosis", "sex"):
        code, err = run_group([demo, out, "group", "--target", target, "--n-permutations", "0",
                               "--cv-repeats", "1", "--cv-folds", "2", "--features", "global",
                               "--compare", "roi"], capsys)
        assert code == 0, err
    for target in ("diagnosis", "sex"):
        path = _group_file(out, f"target-{target}_atlas-AAL3v1_desc-roi_feature-global_"
                                "stat-reconerror_boldmap.nii.gz")
        sidecar = json.loads(path.with_suffix("").with_suffix(".json").read_text())
        assert sidecar["Target"] == target and "reconstruction error" in sidecar["Description"]
    assert not list((out / "group").glob("atlas-*_boldmap.nii.gz"))
