"""The BIDS validator (bids-validator-deno) on real datasets, and the checks of the input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.bids.layout import InputDataset, discover_runs
from bidsapp.bids.validation import ValidatorIssue, run_bids_validator, validate_input
from bidsapp.config import Config
from bidsapp.errors import ExitCode, UsageError, ValidationFailedError


def make_config(bids_dir: Path, tmp_path: Path, **options: object) -> Config:
    return Config(bids_dir=bids_dir, output_dir=tmp_path / "out", analysis_level="participant",
                  work_dir=tmp_path / "w", **options)


@pytest.fixture(scope="module")
def broken_raw(bids_examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synthetic`` with one BOLD file truncated to 0 bytes and a stray file."""
    root = tmp_path_factory.mktemp("broken") / "synthetic"
    shutil.copytree(bids_examples / "synthetic", root)
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (root / "sub-01" / "ses-01" / "func" / "sub-01_ses-01_task-rest_bold.nii").write_bytes(b"")
    (root / "sub-02" / "ses-01" / "func" / "notes.txt").write_text("scanner hiccup\n")
    return root


def test_synthetic_raw_dataset_has_no_errors(bids_examples: Path) -> None:
    # Its NIfTI files are header-only (352 bytes): readable, so the validator only warns
    # (recommended sidecar keys, undefined TSV columns, gzip headers, a short README).
    issues = run_bids_validator(bids_examples / "synthetic")
    assert all(isinstance(issue, ValidatorIssue) for issue in issues)
    assert {issue.severity for issue in issues} == {"warning"}
    codes = {issue.code for issue in issues}
    assert {"SIDECAR_KEY_RECOMMENDED", "README_FILE_SMALL"} <= codes
    readme = next(issue for issue in issues if issue.code == "README_FILE_SMALL")
    assert readme.location == "/README"
    assert readme.message and "\n" not in readme.message


def test_validator_errors_on_broken_raw_dataset(broken_raw: Path) -> None:
    errors = {(i.code, i.location) for i in run_bids_validator(broken_raw) if i.severity == "error"}
    empty = "/sub-01/ses-01/func/sub-01_ses-01_task-rest_bold.nii"
    stray = "/sub-02/ses-01/func/notes.txt"
    assert errors == {("EMPTY_FILE", empty), ("NIFTI_HEADER_UNREADABLE", empty),
                      ("NOT_INCLUDED", stray)}


def test_validate_input_fails_on_broken_raw_dataset(broken_raw: Path, tmp_path: Path) -> None:
    config = make_config(broken_raw, tmp_path)
    dataset = discover_runs(config)  # discovery does not validate
    with pytest.raises(ValidationFailedError) as info:
        validate_input(config, dataset)
    message = str(info.value)
    assert info.value.exit_code == ExitCode.VALIDATION_FAILED
    assert "\n" not in message
    assert message.startswith(f"the BIDS validator found 3 error(s) in {broken_raw}: ")
    assert "EMPTY_FILE at /sub-01/ses-01/func/sub-01_ses-01_task-rest_bold.nii" in message
    assert "NOT_INCLUDED at /sub-02/ses-01/func/notes.txt" in message
    assert message.endswith("; use --skip-bids-validation to proceed")
    skipping = make_config(broken_raw, tmp_path, skip_bids_validation=True)
    validate_input(skipping, dataset)


def test_validate_input_accepts_valid_inputs(bids_examples: Path, tmp_path: Path) -> None:
    for name in ("synthetic", "ds000001-fmriprep"):
        config = make_config(bids_examples / name, tmp_path)
        validate_input(config, discover_runs(config))


def test_derivatives_must_declare_their_type(tmp_path: Path) -> None:
    root = tmp_path / "fmriprep"
    func = root / "sub-01" / "func"
    func.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "fMRIPrep", "BIDSVersion": "1.4.0", "GeneratedBy": [{"Name": "fMRIPrep"}]}))
    for name in ("sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz",
                 "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz"):
        (func / name).touch()
    config = make_config(root, tmp_path)
    dataset = discover_runs(config)
    with pytest.raises(ValidationFailedError, match="DatasetType None, not 'derivative'"):
        validate_input(config, dataset)
    validate_input(make_config(root, tmp_path, skip_bids_validation=True), dataset)


def test_written_derivatives_are_valid(tmp_path: Path, bids_examples: Path) -> None:
    fmriprep = bids_examples / "ds000001-fmriprep"
    writer = DerivativesWriter(tmp_path / "out", source_datasets={"preprocessed": fmriprep})
    writer.ensure_dataset_description()
    run = discover_runs(make_config(fmriprep, tmp_path, selection={"participant_label": ["10"]})
                        ).runs[0]
    img = nib.Nifti1Image(np.ones((3, 4, 5), dtype=np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_xyzt_units("mm")
    mask = writer.path_for(run.entities, suffix="mask", extension=".nii.gz", desc="brain")
    writer.write_nifti(mask, img)
    writer.write_sidecar(mask, {"Type": "Brain", "Resolution": "2 mm isotropic",
                                "Sources": [run.source_uri]})
    atlas = writer.path_for(run.entities, suffix="dseg", extension=".nii.gz", atlas="AAL3")
    writer.write_nifti(atlas, img)
    writer.write_sidecar(atlas, {"Resolution": "2 mm isotropic"})
    # roimae's own tables are not BIDS files yet: listed in .bidsignore
    table = writer.path_for(run.entities, suffix="timeseries", extension=".tsv", atlas="AAL3",
                            desc="embedding")
    writer.write_tsv(table, pd.DataFrame({"dim0": [0.1, 0.2]}))
    writer.ensure_bidsignore(["*_timeseries.tsv"])
    issues = run_bids_validator(tmp_path / "out")
    assert [i for i in issues if i.severity == "error"] == []
    assert any(i.code == "SIDECAR_KEY_RECOMMENDED" for i in issues)  # it did look at the files
    # the same dataset without .bidsignore does fail: the validator really checks
    (tmp_path / "out" / ".bidsignore").unlink()
    assert {i.code for i in run_bids_validator(tmp_path / "out") if i.severity == "error"} == {
        "NOT_INCLUDED"}


def test_missing_validator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                           bids_examples: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match="pip install bids-validator-deno") as info:
        run_bids_validator(bids_examples / "synthetic")
    assert info.value.exit_code == ExitCode.USAGE


def test_validator_timeout(bids_examples: Path) -> None:
    with pytest.raises(ValidationFailedError, match="did not finish"):
        run_bids_validator(bids_examples / "synthetic", timeout=0.001)


def test_skipped_validation_runs_nothing(tmp_path: Path) -> None:
    # a raw root that does not exist would make the validator fail: it is never called
    dataset = InputDataset(root=tmp_path, raw_root=tmp_path / "missing", space="MNI152NLin6Asym",
                           runs=[], participants_file=None, description={})
    validate_input(make_config(tmp_path, tmp_path, skip_bids_validation=True), dataset)
