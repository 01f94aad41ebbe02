"""The group level on synthetic embeddings (no model): folds, statistics, targets, input checks.

The end-to-end tests write fake participant-level outputs (run embeddings with a planted class
difference, and optionally occluded embeddings) for a demo dataset, at the paths
:class:`bidsapp.participant.RunOutputs` gives, and run ``roimae BIDS OUT group`` on them.
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
from bidsapp.bids.layout import discover_runs, read_participants
from bidsapp.cli import build_parser, config_from_args, main
from bidsapp.demo import make_demo_dataset
from bidsapp.errors import BadDataError, ExitCode
from bidsapp.group import corrected_ttest, fold_metrics, make_splits, read_targets
from bidsapp.logs import get_logger
from bidsapp.participant import RunOutputs, _atlas_label

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
        paths = RunOutputs(writer, run, desc, _atlas_label(atlas))
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
    stale = [out / "group" / ".target-diagnosis_desc-roi_folds.k1ll3d.tmp.tsv",
             out / "group" / "figures" / ".target-diagnosis_roc.k1ll3d.tmp.png",
             out / ".group.k1ll3d.tmp.html"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--n-permutations", "20",
                           "--cv-repeats", "2"], capsys)
    assert code == 0, err
    assert not any(path.exists() for path in stale)
    metrics = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_metrics.tsv"), sep="\t",
                          na_values="n/a").set_index("metric")
    assert metrics.loc["balanced_accuracy", "mean"] > 0.8
    # 20 permutations: the smallest possible p is 1/21.
    assert metrics.loc["balanced_accuracy", "permutation_p"] == pytest.approx(1 / 21)
    assert metrics.loc["roc_auc", "mean"] > 0.9
    folds = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_folds.tsv"), sep="\t")
    assert len(folds) == 2 * 5 and set(folds["n_test"] + folds["n_train"]) == {N_PARTICIPANTS}
    predictions = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_predictions.tsv"),
                              sep="\t")
    # Every participant is tested exactly once per repeat.
    assert (predictions.groupby("repeat")["participant_id"].value_counts() == 1).all()
    assert predictions["participant_id"].nunique() == N_PARTICIPANTS
    confusion = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_confusion.tsv"), sep="\t")
    assert confusion["true"].tolist() == ["adhd", "control"]
    assert confusion[["adhd", "control"]].to_numpy().sum() == 2 * N_PARTICIPANTS
    settings = json.loads(_group_file(out, "target-diagnosis_settings.json").read_text())
    assert settings["classes"] == ["adhd", "control"]
    assert settings["cv_groups"] == "participant_id" and settings["descs"] == ["roi"]
    assert (out / "group.html").is_file()
    # Region importance: only the planted region matters; the unhideable one has no value.
    attribution = pd.read_csv(
        _group_file(out, "target-diagnosis_atlas-AAL3v1_desc-roi_attribution.tsv"), sep="\t",
        na_values="n/a").set_index("name")
    importance = attribution["importance"]
    assert importance.idxmax() == KEY_REGION and importance[KEY_REGION] > 0.1
    assert np.isnan(importance[HIDDEN_REGION])
    others = importance.drop([KEY_REGION, HIDDEN_REGION])
    assert np.allclose(others, 0.0, atol=1e-9)
    assert _group_file(out, "target-diagnosis_atlas-AAL3v1_desc-roi_stat-importance_boldmap"
                            ".nii.gz").is_file()


def test_group_level_without_occluded_embeddings_has_no_importance(demo: Path, tmp_path: Path,
                                                                   atlas: Atlas, capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas, occluded=False)
    # An earlier group run of the same target (another model, maps with attribution) and one of
    # another target: the first one's outputs go, the second one's stay.
    stale = [out / "group/target-diagnosis_desc-random_metrics.tsv",
             out / "group/target-diagnosis_atlas-AAL3v1_desc-roi_stat-importance_boldmap.nii.gz",
             out / "group/atlas-AAL3v1_desc-roi_stat-reconerror_boldmap.nii.gz",
             out / "group/figures/target-diagnosis_desc-random_confusion.png"]
    other = out / "group/target-site_desc-roi_metrics.tsv"
    for path in [*stale, other]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("old\n")
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--n-permutations", "0",
                           "--cv-repeats", "1"], capsys)
    assert code == 0, err
    assert not any(path.exists() for path in stale) and other.is_file()
    # Said in the log and the report, not an empty heading.
    assert "region importance not computed for desc-roi: no run has region attribution" in err
    assert "--no-attribution" in (out / "group.html").read_text()
    # The completion marker is written last.
    marker = _group_file(out, "target-diagnosis_settings.json")
    outputs = [p for p in (out / "group").rglob("target-diagnosis_*") if p != marker]
    assert outputs and all(p.stat().st_mtime_ns <= marker.stat().st_mtime_ns for p in outputs)
    assert json.loads(marker.read_text())["models"] == {"roi": "0" * 64}
    attribution = pd.read_csv(_group_file(out, "target-diagnosis_atlas-AAL3v1_desc-roi_"
                                               "attribution.tsv"), sep="\t", na_values="n/a")
    assert len(attribution) == len(atlas.regions)
    assert attribution[["importance", "importance_se", "reconerror", "occlusion"]].isna().all().all()
    assert not list((out / "group").glob("*_boldmap.nii.gz"))
    metrics = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_metrics.tsv"), sep="\t",
                          na_values="n/a").set_index("metric")
    assert metrics.loc["balanced_accuracy", "mean"] > 0.8
    assert np.isnan(metrics.loc["balanced_accuracy", "permutation_p"])   # --n-permutations 0


def test_group_level_cv_groups_keeps_each_site_out_of_training(demo: Path, tmp_path: Path,
                                                               atlas: Atlas, capsys) -> None:
    out = tmp_path / "out"
    write_fake_outputs(demo, out, atlas)
    # Two sites, so two folds: leave-one-site-out.
    code, err = run_group([demo, out, "group", "--target", "diagnosis", "--cv-groups", "site",
                           "--cv-folds", "2", "--cv-repeats", "1", "--n-permutations", "0"],
                          capsys)
    assert code == 0, err
    site = pd.read_csv(demo / "participants.tsv", sep="\t").set_index("participant_id")["site"]
    predictions = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_predictions.tsv"),
                              sep="\t")
    test_sites = predictions.groupby("fold")["participant_id"].agg(lambda p: set(site[p]))
    assert sorted(map(sorted, test_sites)) == [["siteA"], ["siteB"]]
    folds = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_folds.tsv"), sep="\t")
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
                           "--cv-repeats", "1"], capsys)
    assert code == 0, err
    assert "desc-roi: 2 selected runs have no complete embedding" in err
    predictions = pd.read_csv(_group_file(out, "target-diagnosis_desc-roi_predictions.tsv"),
                              sep="\t")
    assert predictions["participant_id"].nunique() == N_PARTICIPANTS - 2
    assert not {"sub-01", "sub-02"} & set(predictions["participant_id"])


@pytest.fixture
def demo_copy(demo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "demo"
    shutil.copytree(demo, copy)
    return copy


@pytest.mark.parametrize(("case", "options", "message"), [
    ("no column", ["--target", "DX"], "participants.tsv has no column 'DX'"),
    ("no cv column", ["--target", "diagnosis", "--cv-groups", "scanner"],
     "no column 'scanner' (--cv-groups)"),
    ("single class", ["--target", "diagnosis"], "the target has a single class ('control')"),
    ("too few", ["--target", "diagnosis", "--participant-label", "01", "02", "03", "04", "05",
                 "06"], "too few participants for 5-fold cross-validation"),
    ("too few groups", ["--target", "diagnosis", "--cv-groups", "site"],
     "only 2 cross-validation groups for 5 folds"),
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
    code, err = run_group([demo_copy, out, "group", *options], capsys)
    assert code == 65
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("roimae: error: ")
    assert message in err.splitlines()[-1]
    # Nothing of the group level was written.
    assert not (out / "group").exists() and not (out / "group.html").exists()
