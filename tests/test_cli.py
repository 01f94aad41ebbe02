"""The command line as a user meets it: options, exit codes (README table), error lines, logs.

Runs go through :func:`bidsapp.cli.main` in-process (stderr captured with ``capsys``) and, for the
console entry itself, through ``python -m bidsapp`` in a subprocess.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bidsapp._version import __version__
from bidsapp.cli import build_parser, config_from_args, main
from bidsapp.cli.demo import DEMO_MASKINGS, DEMO_READOUTS, demo_configs
from bidsapp.cli.parser import FANOUT, config_field
from bidsapp.config import MASKING_NAMES
from bidsapp.demo import make_demo_dataset
from bidsapp.errors import UsageError
from bidsapp.model.masking import build_masking
from bidsapp.model.regions import RegionGrid

#: A console log record (``HH:MM:SS [LEVEL] message``), as bidsapp.logs formats them.
LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d \[(DEBUG|INFO|WARNING|ERROR)\] ")
PRETRAIN_FAST = ["--epochs", "1", "--window-frames", "10"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``roimae ARGV`` in-process; return (exit code, stdout, stderr).

    Errors found by argparse (unknown option, bad type or choice), ``--help`` and ``--version``
    leave :func:`main` as ``SystemExit``, as the console script does; its code is returned.
    """
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(stderr: str) -> str:
    """The error of a failed run: check it is one line and return it.

    Log records of the run (progress written to stderr before the failure) may precede it; apart
    from them, stderr must be exactly one line starting with ``roimae: error:``, the last one,
    with no traceback.
    """
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    others = [line for line in lines if not LOG_RECORD.match(line)]
    assert len(others) == 1, f"expected one error line, got {others}"
    assert lines[-1] == others[0]
    assert others[0].startswith("roimae: error: ")
    return others[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-participant, 20-frame demo dataset (read-only for the tests)."""
    root = tmp_path_factory.mktemp("cli") / "demo"
    make_demo_dataset(root, n_participants=4, n_frames=20, seed=0)
    return root


# --- the console entry ----------------------------------------------------------------------------

def _console(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bidsapp", *args], capture_output=True, text=True,
                          timeout=300, check=False, cwd=cwd)


def test_console_version_and_help() -> None:
    done = _console("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"roimae {__version__}"
    done = _console("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: roimae")
    for option in ("--participant-label", "--device", "--target", "--masking", "-vv"):
        assert option in done.stdout


def test_console_demo_writes_a_dataset(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = _console("demo", str(out), "--participants", "4", "--frames", "3")
    assert done.returncode == 0, done.stderr
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    bold = sorted(out.glob("sub-*/func/*_space-MNI152NLin6Asym_res-2_desc-preproc_bold.nii.gz"))
    masks = sorted(out.glob("sub-*/func/*_desc-brain_mask.nii.gz"))
    assert [p.name.split("_")[0] for p in bold] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert len(masks) == 4
    header = (out / "participants.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["participant_id", "diagnosis", "age", "sex", "site", "coupling", "subregional"]


def test_demo_into_a_non_empty_dir_needs_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["demo", str(out), "--participants", "4", "--frames", "2"]
    assert main(argv) == 0
    bold = next(out.glob("sub-01/func/*_bold.nii.gz"))
    stamp = bold.stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 64
    assert error_line(capsys.readouterr().err).endswith("is not empty: choose a new or empty "
                                                        "directory for the demo, or pass "
                                                        "--overwrite to replace files of the "
                                                        "same names there")
    assert bold.stat().st_mtime_ns == stamp
    assert main([*argv, "--overwrite"]) == 0
    assert bold.stat().st_mtime_ns != stamp


@pytest.mark.parametrize("overwrite", [False, True])
def test_demo_chain_configs_are_those_of_its_command_lines(tmp_path: Path, overwrite: bool) -> None:
    """``roimae demo --run`` builds its configs directly: the same as parsing each step's argv."""
    bids, out = tmp_path / "bids", tmp_path / "out"
    common = [str(bids), str(out), "-v", "--nprocs", "2"]
    argvs = []
    for masking in DEMO_MASKINGS:
        argvs.append([*common, "pretrain", "--masking", masking, "--preset", "tiny", "--epochs", "12",
                      "--batch-size", "4", "--lr", "3e-3", "--window-frames", "10",
                      *(["--overwrite"] if overwrite else [])])
        argvs.append([*common, "participant", "--model-desc", masking])
    argvs.append([*common, "group", "--target", "diagnosis", "--compare", *DEMO_MASKINGS, "fc",
                  "tangent",
                  "covariates", "--features", *DEMO_READOUTS, "--covariates", "age", "sex",
                  "--n-permutations", "50"])
    expected = [config_from_args(build_parser().parse_args(argv)) for argv in argvs]
    assert demo_configs(bids, out, verbosity=1, nprocs=2, n_permutations=50,
                        overwrite=overwrite) == expected


def test_bids_dir_named_demo_is_not_the_demo_command(tmp_path: Path) -> None:
    # ``demo OUT pretrain`` is a BIDS-App call on ./demo, which does not exist here.
    done = _console("demo", str(tmp_path / "out"), "pretrain", cwd=tmp_path)
    assert done.returncode == 66
    assert done.stderr.splitlines() == [
        f"roimae: error: BIDS_DIR {tmp_path / 'demo'} does not exist or is not a directory"]


def test_console_error_is_one_line_and_the_exit_status(tmp_path: Path) -> None:
    done = _console(str(tmp_path / "missing"), str(tmp_path / "out"), "pretrain")
    assert done.returncode == 66
    assert done.stderr.splitlines() == [
        f"roimae: error: BIDS_DIR {tmp_path / 'missing'} does not exist or is not a directory"]


# --- options ------------------------------------------------------------------------------------

def test_both_spellings_of_participant_label_give_the_same_config(tmp_path: Path) -> None:
    def config(*options: str):
        return config_from_args(build_parser().parse_args(
            [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", *options]))

    dashed = config("--participant-label", "sub-02", "01", "--model-desc", "roi")
    underscored = config("--participant_label", "02", "sub-01", "--model_desc", "roi")
    assert dashed == underscored
    assert dashed.selection.participant_label == ["01", "02"]
    assert config().selection.participant_label is None


def test_options_take_their_defaults_and_choices_from_the_config() -> None:
    """Each option sets a Config field (its dest), whose default and choices it shows."""
    parser = build_parser()
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        field = config_field(FANOUT.get(action.dest, (action.dest,))[0])
        if action.default is not None:
            assert action.default == field.get_default(call_default_factory=True), action.dest
        if action.choices is not None:
            assert all(repr(c) in str(field.annotation) for c in action.choices), action.dest
    text = parser.format_help()
    assert "(default: None)" not in text
    for action in parser._actions:
        assert parser._get_formatter()._get_help_string(action).count("default") <= 1, action.dest


def test_masking_choices_are_the_strategies_the_model_builds() -> None:
    """``--masking`` offers config.MASKING_NAMES: each is a strategy of build_masking."""
    labels = torch.zeros(4, 4, 4, dtype=torch.long)
    labels[2:] = 1
    grid = RegionGrid.from_labels(labels, torch.ones(4, 4, 4, dtype=torch.bool), 2, 2)
    for name in MASKING_NAMES:
        build_masking(name, grid, 0.5)
    with pytest.raises(UsageError, match="unknown masking"):
        build_masking("brainrandom", grid, 0.5)


# --- exit codes of the README table ---------------------------------------------------------------

def test_unknown_level_exits_17(demo: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli([demo, tmp_path / "out", "train"], capsys)
    assert code == 17
    assert "unknown analysis level 'train'" in error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--epochs", "0"], "pretrain.epochs"),
    (["--epochs", "abc"], "argument --epochs: invalid int value"),
    (["--mask-ratio", "1.5"], "masking.mask_ratio"),
    (["--device", "gpu"], "argument --device: invalid choice"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--participant-label", "../x"], "invalid participant label '../x'"),
    (["--participant_label", "01", "sub-0/2"], "invalid participant label '0/2'"),
    (["--atlas", "atlas.nii.gz"], "--atlas and --atlas-labels must be given together"),
    (["--atlas-labels", "labels.tsv"], "--atlas and --atlas-labels must be given together"),
])
def test_usage_errors_exit_64(demo: Path, tmp_path: Path, capsys, options: list[str],
                              message: str) -> None:
    code, _, err = run_cli([demo, tmp_path / "out", "pretrain", *options], capsys)
    assert code == 64
    assert message in error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside", ["", "derivatives/roimae"])
def test_output_dir_equal_to_or_inside_bids_dir_exits_64(tmp_path: Path, capsys,
                                                        inside: str) -> None:
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    out = bids / inside if inside else bids
    code, _, err = run_cli([bids, out, "pretrain"], capsys)
    assert code == 64
    assert "is BIDS_DIR or inside it" in error_line(err)
    assert sorted(p.name for p in bids.iterdir()) == ["dataset_description.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu_exits_64(demo: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli([demo, tmp_path / "out", "pretrain", "--device", "cuda"], capsys)
    assert code == 64
    assert "--device cuda" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_missing_bids_dir_exits_66(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli([tmp_path / "nope", tmp_path / "out", "participant"], capsys)
    assert code == 66
    assert "does not exist" in error_line(err)


@pytest.mark.parametrize("which", ["output", "work"])
def test_output_or_work_dir_that_cannot_be_created_exits_73(demo: Path, tmp_path: Path, capsys,
                                                           which: str) -> None:
    # Under a regular file: refused even for root, who ignores permissions.
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    if which == "output":
        argv = [demo, afile / "out", "pretrain"]
    else:
        argv = [demo, tmp_path / "out", "pretrain", "-w", afile / "work"]
    code, _, err = run_cli(argv, capsys)
    assert code == 73
    assert f"cannot create directory {afile}" in error_line(err)


def test_unknown_participant_label_exits_18(demo: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli([demo, tmp_path / "out", "pretrain", "--participant-label", "01",
                            "sub-99"], capsys)
    assert code == 18
    line = error_line(err)
    assert "participant label(s) 99 not found" in line and "01, 02, 03, 04" in line


def test_bids_dir_without_dataset_description_exits_16(tmp_path: Path, capsys) -> None:
    bids = tmp_path / "bids"
    (bids / "sub-01" / "func").mkdir(parents=True)
    code, _, err = run_cli([bids, tmp_path / "out", "pretrain"], capsys)
    assert code == 16
    assert "no dataset_description.json" in error_line(err)


def test_raw_dataset_without_mni_bold_exits_65(bids_examples: Path, tmp_path: Path,
                                              capsys) -> None:
    source = bids_examples / "synthetic"
    raw = tmp_path / "synthetic"
    # The raw dataset alone: its BOLD is in native space, and there is no fMRIPrep output.
    shutil.copytree(source, raw, ignore=lambda d, names: ["derivatives"] if Path(d) == source
                    else [])
    assert not (raw / "derivatives").exists() and list(raw.glob("sub-01/ses-01/func/*_bold.nii"))
    code, _, err = run_cli([raw, tmp_path / "out", "pretrain"], capsys)
    assert code == 65
    line = error_line(err)
    assert "no MNI-space preprocessed BOLD" in line and "run fMRIPrep" in line


@pytest.fixture
def corrupt_demo(demo: Path, tmp_path: Path) -> Path:
    """A copy of the demo whose first BOLD run is cut in half (a truncated download)."""
    copy = tmp_path / "corrupt"
    shutil.copytree(demo, copy)
    bold = next(copy.glob("sub-01/func/*_desc-preproc_bold.nii.gz"))
    with open(bold, "r+b") as fh:
        fh.truncate(bold.stat().st_size // 2)
    return copy


def test_corrupt_bold_exits_65_without_partial_outputs(corrupt_demo: Path, tmp_path: Path,
                                                       capsys) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli([corrupt_demo, out, "pretrain", *PRETRAIN_FAST], capsys)
    assert code == 65
    line = error_line(err)
    assert "cannot read" in line and "sub-01_task-rest" in line
    # The failed run is logged, but wrote nothing else: no model, no checkpoint, no dataset files.
    assert {p.name for p in out.iterdir()} <= {"logs", ".roimae-work"}
    assert not (out / "models").exists()
    assert len(list((out / "logs").glob("roimae-pretrain-*_config.json"))) == 1
    assert len(list((out / "logs").glob("roimae-pretrain-*.log"))) == 1


def test_double_verbose_prints_the_traceback(demo: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli([demo, tmp_path / "out", "pretrain", "--participant-label", "../x",
                            "-vv"], capsys)
    assert code == 64
    assert "Traceback (most recent call last)" in err
    assert "UsageError" in err
    assert err.splitlines()[-1].startswith("roimae: error: selection.participant_label")


def test_signal_during_a_lazy_import_is_an_interruption(demo: Path, tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    """Ctrl-C while a module initialises surfaces as ImportError; it still exits 130 in one line."""
    import bidsapp.pretrain

    def interrupted_import(*args: object) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    monkeypatch.setattr(bidsapp.pretrain, "run_pretrain", interrupted_import)
    code, _, err = run_cli([demo, tmp_path / "out", "pretrain"], capsys)
    assert code == 130
    assert err.splitlines()[-1].startswith("roimae: interrupted (SIGINT); outputs completed")
    (log_file,) = (tmp_path / "out/logs").glob("roimae-pretrain-*.log")
    assert "[ERROR] interrupted (SIGINT)" in log_file.read_text()


# --- logs and configuration of a successful run ----------------------------------------------------

def test_pretrain_run_saves_its_config_and_log(demo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = [str(demo), str(out), "pretrain", *PRETRAIN_FAST]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert (out / "models" / "desc-roi" / "model.safetensors").is_file()
    configs = list((out / "logs").glob("roimae-pretrain-*_config.json"))
    logs = list((out / "logs").glob("roimae-pretrain-*.log"))
    assert len(configs) == 1 and len(logs) == 1
    assert logs[0].name == configs[0].name.replace("_config.json", ".log")
    saved = json.loads(configs[0].read_text())
    assert saved == config_from_args(build_parser().parse_args(argv)).model_dump(mode="json")
    assert saved["analysis_level"] == "pretrain"
    assert saved["pretrain"]["epochs"] == 1 and saved["preprocess"]["window_frames"] == 10
    assert saved["bids_dir"] == str(demo) and saved["output_dir"] == str(out)
    log = logs[0].read_text()
    assert "roimae pretrain level finished" in log
    assert "selected 4 BOLD run(s) of 4 participant(s)" in log


def test_a_covariate_named_twice_is_one_feature(tmp_path: Path) -> None:
    args = build_parser().parse_args([str(tmp_path), str(tmp_path / "out"), "group", "--target",
                                      "diagnosis", "--covariates", "age", "sex", "age"])
    assert config_from_args(args).group.covariates == ["age", "sex"]
