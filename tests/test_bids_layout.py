"""Input discovery on real fMRIPrep layouts (bids-examples) and small datasets made in tmp."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bidsapp.bids.layout import InputDataset, discover_runs
from bidsapp.config import Config
from bidsapp.errors import (
    BadDataError,
    ExitCode,
    NoInputError,
    NothingSelectedError,
    UsageError,
    ValidationFailedError,
)

TASK = "balloonanalogrisktask"
FMRIPREP_SUBJECTS = ["10", "11", "13", "16"]


def make_config(bids_dir: Path, tmp_path: Path, **selection: Any) -> Config:
    return Config(bids_dir=bids_dir, output_dir=tmp_path / "out", analysis_level="participant",
                  work_dir=tmp_path / "w", selection=selection)


def discover(bids_dir: Path, tmp_path: Path, **selection: Any) -> InputDataset:
    return discover_runs(make_config(bids_dir, tmp_path, **selection))


@pytest.fixture(scope="session")
def ds000001(bids_examples: Path) -> Path:
    return bids_examples / "ds000001-fmriprep"


@pytest.fixture(scope="session")
def synthetic(bids_examples: Path) -> Path:
    return bids_examples / "synthetic"


@pytest.fixture
def messages(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of the ``roimae.bids`` logger (which need not propagate to the root logger)."""
    logger = logging.getLogger("roimae.bids")
    logger.addHandler(caplog.handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.setLevel(level)
    logger.removeHandler(caplog.handler)


def write_derivatives(root: Path, files: dict[str, dict | None],
                      description: dict | None = None) -> Path:
    """A derivatives dataset of empty files; a dict value is written as the JSON sidecar."""
    root.mkdir(parents=True)
    description = description or {"Name": "fMRIPrep", "BIDSVersion": "1.8.0",
                                   "DatasetType": "derivative",
                                   "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.0"}]}
    (root / "dataset_description.json").write_text(json.dumps(description))
    add_files(root, files)
    return root


def add_files(root: Path, files: dict[str, dict | None]) -> None:
    for name, sidecar in files.items():
        path = root / name.split("_")[0] / "func" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        if sidecar is not None:
            path.with_name(name.split(".")[0] + ".json").write_text(json.dumps(sidecar))


def bold_and_mask(prefix: str, tr: float = 2.0) -> dict[str, dict | None]:
    return {f"{prefix}_desc-preproc_bold.nii.gz": {"RepetitionTime": tr},
            f"{prefix}_desc-brain_mask.nii.gz": None}


# --- fMRIPrep 20.2 derivatives as BIDS_DIR ------------------------------------------------------


def test_fmriprep_derivatives_default(ds000001: Path, tmp_path: Path) -> None:
    dataset = discover(ds000001, tmp_path)
    assert dataset.root == ds000001
    assert dataset.raw_root is None
    assert dataset.space == "MNI152NLin2009cAsym"
    assert dataset.participants is None  # fMRIPrep writes no participants.tsv
    assert dataset.description["GeneratedBy"][0]["Name"] == "fMRIPrep"
    assert dataset.datasets == {"preprocessed": ds000001}
    # 4 participants x 3 runs, sorted by name
    assert [(r.subject, r.entities["run"]) for r in dataset.runs] == [
        (sub, run) for sub in FMRIPREP_SUBJECTS for run in ("1", "2", "3")]
    first = dataset.runs[0]
    assert first.name == f"sub-10_task-{TASK}_run-1_space-MNI152NLin2009cAsym_res-2"
    assert first.session is None
    assert first.entities == {"sub": "10", "task": TASK, "run": "1",
                              "space": "MNI152NLin2009cAsym", "res": "2"}
    assert first.bold == ds000001 / "sub-10" / "func" / f"{first.name}_desc-preproc_bold.nii.gz"
    assert first.source_uri == f"bids:preprocessed:sub-10/func/{first.bold.name}"
    for run in dataset.runs:
        assert run.mask == run.bold.with_name(f"{run.name}_desc-brain_mask.nii.gz")
        assert run.repetition_time == 2.0  # "RepetitionTime": 2.0 in each sidecar


def test_participant_and_task_labels(ds000001: Path, tmp_path: Path) -> None:
    dataset = discover(ds000001, tmp_path, participant_label=["sub-13", "11"], task_label=[TASK])
    assert [r.name.split("_space")[0] for r in dataset.runs] == [
        f"sub-{sub}_task-{TASK}_run-{run}" for sub in ("11", "13") for run in (1, 2, 3)]


def test_filter_file(ds000001: Path, tmp_path: Path) -> None:
    dataset = discover(ds000001, tmp_path, bids_filters={"bold": {"run": [2], "subject": "16"}})
    assert [r.name for r in dataset.runs] == [
        f"sub-16_task-{TASK}_run-2_space-MNI152NLin2009cAsym_res-2"]


def test_filter_file_with_unknown_entity(ds000001: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="colour"):
        discover(ds000001, tmp_path, bids_filters={"bold": {"colour": "red"}})


def test_space_without_preprocessed_bold(ds000001: Path, tmp_path: Path) -> None:
    # this fMRIPrep run wrote MNI152NLin6Asym only for ICA-AROMA (desc-smoothAROMAnonaggr)
    with pytest.raises(NothingSelectedError, match="MNI152NLin2009cAsym") as info:
        discover(ds000001, tmp_path, space="MNI152NLin6Asym")
    assert info.value.exit_code == ExitCode.NOTHING_SELECTED


def test_bold_without_mask(ds000001: Path, tmp_path: Path) -> None:
    # the AROMA outputs have no brain mask in MNI152NLin6Asym
    with pytest.raises(BadDataError, match="no brain mask") as info:
        discover(ds000001, tmp_path, space="MNI152NLin6Asym",
                 bids_filters={"bold": {"desc": "smoothAROMAnonaggr"}})
    assert info.value.exit_code == ExitCode.BAD_DATA
    assert f"sub-10_task-{TASK}_run-1_space-MNI152NLin6Asym_desc-smoothAROMAnonaggr" in str(
        info.value)


def test_unknown_participant(ds000001: Path, tmp_path: Path) -> None:
    with pytest.raises(NothingSelectedError) as info:
        discover(ds000001, tmp_path, participant_label=["10", "99", "sub-42"])
    assert info.value.exit_code == ExitCode.NOTHING_SELECTED
    assert "42, 99 not found" in str(info.value)


def test_filters_selecting_nothing(ds000001: Path, tmp_path: Path) -> None:
    with pytest.raises(NothingSelectedError) as info:
        discover(ds000001, tmp_path, task_label=["rest"])
    assert info.value.exit_code == ExitCode.NOTHING_SELECTED
    with pytest.raises(NothingSelectedError):
        discover(ds000001, tmp_path, session_label=["1"])


def test_space_that_is_not_mni(ds000001: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not an MNI template"):
        discover(ds000001, tmp_path, space="fsnative")


# --- raw dataset with derivatives/fmriprep ----------------------------------------------------


def test_raw_with_fmriprep_inside(synthetic: Path, tmp_path: Path) -> None:
    dataset = discover(synthetic, tmp_path)
    fmriprep = synthetic / "derivatives" / "fmriprep"
    assert dataset.root == fmriprep
    assert dataset.raw_root == synthetic
    assert dataset.datasets == {"preprocessed": fmriprep, "raw": synthetic}
    assert dataset.space == "MNI152NLin2009cAsym"  # space-T1w runs are never chosen
    # 5 participants x 2 sessions x (nback run-01, run-02, rest)
    assert len(dataset.runs) == 30
    assert {r.session for r in dataset.runs} == {"01", "02"}
    run = dataset.runs[0]
    assert run.name == "sub-01_ses-01_task-nback_run-01_space-MNI152NLin2009cAsym"
    assert run.mask.name == f"{run.name}_label-brain_mask.nii"  # fMRIPrep < 20.2 naming
    assert run.repetition_time == 2.5
    assert run.source_uri == f"bids:preprocessed:sub-01/ses-01/func/{run.bold.name}"
    pd.testing.assert_frame_equal(dataset.participants, pd.DataFrame({
        "participant_id": ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05"],
        "age": [34, 38, 22, 21, 42], "sex": ["F", "M", "M", "F", "M"]}), check_dtype=False)


def test_session_label(synthetic: Path, tmp_path: Path) -> None:
    dataset = discover(synthetic, tmp_path, session_label=["02"], participant_label=["03"],
                       task_label=["rest"])
    assert [r.name for r in dataset.runs] == ["sub-03_ses-02_task-rest_space-MNI152NLin2009cAsym"]


def test_raw_with_derivatives_option(synthetic: Path, tmp_path: Path) -> None:
    fmriprep = synthetic / "derivatives" / "fmriprep"
    dataset = discover(synthetic, tmp_path, derivatives={"fmriprep": fmriprep},
                       task_label=["rest"])
    assert dataset.root == fmriprep
    assert len(dataset.runs) == 10


def test_raw_without_derivatives(synthetic: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(synthetic, raw, ignore=shutil.ignore_patterns("derivatives"))
    with pytest.raises(BadDataError, match=r"run fMRIPrep \(--output-spaces") as info:
        discover(raw, tmp_path)
    assert info.value.exit_code == ExitCode.BAD_DATA


def test_no_dataset_description(tmp_path: Path) -> None:
    (tmp_path / "data" / "sub-01").mkdir(parents=True)
    with pytest.raises(ValidationFailedError, match=r"no dataset_description\.json") as info:
        discover(tmp_path / "data", tmp_path)
    assert info.value.exit_code == ExitCode.VALIDATION_FAILED


# --- small derivatives made here: spaces, resolutions, sidecars -------------------------------


def test_resolution_and_space_preference(tmp_path: Path,
                                         messages: pytest.LogCaptureFixture) -> None:
    root = write_derivatives(tmp_path / "fmriprep", {
        **bold_and_mask("sub-01_task-rest_space-MNI152NLin6Asym_res-1"),
        **bold_and_mask("sub-01_task-rest_space-MNI152NLin6Asym_res-2"),
        **bold_and_mask("sub-01_task-rest_space-T1w"),
        **bold_and_mask("sub-02_task-rest_space-MNI152NLin2009cSym_res-1"),
    })
    dataset = discover(root, tmp_path)
    assert dataset.space == "MNI152NLin6Asym"  # MNI152NLin2009cAsym is absent
    assert [r.name for r in dataset.runs] == ["sub-01_task-rest_space-MNI152NLin6Asym_res-2"]
    assert "space MNI152NLin6Asym has resolutions 1, 2; using res-2" in messages.text
    fixed = discover(root, tmp_path, bids_filters={"bold": {"res": "1"}})
    assert [r.name for r in fixed.runs] == ["sub-01_task-rest_space-MNI152NLin6Asym_res-1"]
    other = discover(root, tmp_path, space="MNI152NLin2009cSym")
    assert [r.name for r in other.runs] == ["sub-02_task-rest_space-MNI152NLin2009cSym_res-1"]
    with pytest.raises(NothingSelectedError, match="--space"):
        discover(root, tmp_path, participant_label=["02"])


def test_first_resolution_without_res_2(tmp_path: Path) -> None:
    root = write_derivatives(tmp_path / "fmriprep", {
        **bold_and_mask("sub-01_task-rest_space-MNI152NLin2009cAsym_res-10"),
        **bold_and_mask("sub-01_task-rest_space-MNI152NLin2009cAsym_res-3"),
    })
    assert discover(root, tmp_path).runs[0].entities["res"] == "3"


@pytest.mark.parametrize("tr", [0, -2.0, "2s"])
def test_bad_repetition_time(tmp_path: Path, tr: Any) -> None:
    root = write_derivatives(tmp_path / "fmriprep",
                             bold_and_mask("sub-01_task-rest_space-MNI152NLin2009cAsym", tr=tr))
    with pytest.raises(BadDataError, match="RepetitionTime"):
        discover(root, tmp_path)


def test_missing_repetition_time(tmp_path: Path) -> None:
    root = write_derivatives(tmp_path / "fmriprep", {
        "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz": {},
        "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz": None,
    })
    assert discover(root, tmp_path).runs[0].repetition_time is None


@pytest.mark.filterwarnings("ignore:The PipelineDescription field:UserWarning")
def test_derivatives_without_dataset_type(tmp_path: Path) -> None:
    # fMRIPrep < 1.4 named itself but wrote no DatasetType: still read as derivatives
    root = write_derivatives(tmp_path / "fmriprep",
                             bold_and_mask("sub-01_task-rest_space-MNI152NLin2009cAsym"),
                             description={"Name": "fMRIPrep", "BIDSVersion": "1.1.1",
                                          "PipelineDescription": {"Name": "fMRIPrep"}})
    dataset = discover(root, tmp_path)
    assert dataset.raw_root is None and len(dataset.runs) == 1


def test_database_is_reused_and_rebuilt_for_another_dataset(
        tmp_path: Path, messages: pytest.LogCaptureFixture) -> None:
    first = write_derivatives(tmp_path / "a", bold_and_mask("sub-01_task-rest_space-MNI152Lin"))
    second = write_derivatives(tmp_path / "b", bold_and_mask("sub-02_task-rest_space-MNI152Lin"))
    database = tmp_path / "db"
    config = Config(bids_dir=first, output_dir=tmp_path / "out", analysis_level="participant",
                    work_dir=tmp_path / "w", bids_database_dir=database,
                    selection={"space": "MNI152Lin"})
    assert [r.subject for r in discover_runs(config).runs] == ["01"]
    assert (database / "layout_index.sqlite").is_file()
    # a file added after indexing is not seen: the index is reused, not rebuilt
    add_files(first, bold_and_mask("sub-03_task-rest_space-MNI152Lin"))
    assert [r.subject for r in discover_runs(config).runs] == ["01"]
    assert "rebuilding" not in messages.text
    # the same database for another dataset is rebuilt, not silently reused
    other = config.model_copy(update={"bids_dir": second})
    assert [r.subject for r in discover_runs(other).runs] == ["02"]
    assert "indexes other datasets; rebuilding it" in messages.text


# --- several derivative roots (-d NAME=PATH) ---------------------------------------------------


def test_runs_from_several_derivative_roots(tmp_path: Path) -> None:
    main = write_derivatives(tmp_path / "fmriprep",
                             bold_and_mask("sub-01_task-rest_space-MNI152NLin6Asym"))
    extra = write_derivatives(tmp_path / "site2" / "fmriprep",
                              bold_and_mask("sub-02_task-rest_space-MNI152NLin6Asym"))
    dataset = discover(main, tmp_path, derivatives={"site2": extra})
    assert dataset.datasets == {"preprocessed": main, "site2": extra}
    assert [r.source_uri.rsplit("/", 1)[0] for r in dataset.runs] == [
        "bids:preprocessed:sub-01/func", "bids:site2:sub-02/func"]


def test_same_run_in_two_roots(tmp_path: Path) -> None:
    files = bold_and_mask("sub-01_task-rest_space-MNI152NLin6Asym")
    main = write_derivatives(tmp_path / "fmriprep", files)
    copy = write_derivatives(tmp_path / "rerun", files)
    with pytest.raises(UsageError, match="is in two derivative datasets"):
        discover(main, tmp_path, derivatives={"rerun": copy})


def test_derivative_roots_with_the_same_folder_name(tmp_path: Path) -> None:
    files = bold_and_mask("sub-01_task-rest_space-MNI152NLin6Asym")
    main = write_derivatives(tmp_path / "main", files)
    first = write_derivatives(tmp_path / "a" / "fmriprep", {})
    second = write_derivatives(tmp_path / "b" / "fmriprep", {})
    with pytest.raises(UsageError, match="already been added"):
        discover(main, tmp_path, derivatives={"a": first, "b": second})


@pytest.mark.parametrize(("name", "error", "code"), [
    ("fmriprep", NoInputError, ExitCode.NO_INPUT),  # the path does not exist
    ("raw", UsageError, ExitCode.USAGE),  # reserved for BIDS_DIR
])
def test_bad_derivatives_option(synthetic: Path, tmp_path: Path, name: str,
                                error: type[Exception], code: ExitCode) -> None:
    path = tmp_path / "missing" if error is NoInputError else synthetic / "derivatives" / "fmriprep"
    with pytest.raises(error) as info:
        discover(synthetic, tmp_path, derivatives={name: path})
    assert info.value.exit_code == code
