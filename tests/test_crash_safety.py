"""Crash safety: a job killed with SIGKILL (out of memory, out of time) leaves nothing a re-run trips on.

Each test starts ``python -m bidsapp`` in a subprocess, kills it with SIGKILL at a point where it is
writing outputs, checks that every file under its final name is whole, then runs the same command
again and checks the outputs are complete and valid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsapp.cli import main
from bidsapp.demo import make_demo_dataset
from bidsapp.io import file_sha256

pytestmark = pytest.mark.slow

ENTITIES = "task-rest_space-MNI152NLin6Asym_res-2"
ATLAS_ENTITIES = "task-rest_space-MNI152NLin6Asym_atlas-AAL3v1_res-2"
#: The data files of one run, ``<prefix>`` standing for ``sub-XX``; each has a JSON sidecar too
#: except the window and occluded embeddings and the tables.
RUN_FILES = (
    f"{{sub}}_{ENTITIES}_desc-roi_embedding.tsv",
    f"{{sub}}_{ENTITIES}_desc-roi_stat-mean_embedding.tsv",
    f"{{sub}}_{ENTITIES}_desc-roi_stat-mean_embedding.json",
    f"{{sub}}_{ATLAS_ENTITIES}_desc-roi_stat-occluded_embedding.tsv",
    f"{{sub}}_{ATLAS_ENTITIES}_desc-roi_stat-reconerror_boldmap.nii.gz",
    f"{{sub}}_{ATLAS_ENTITIES}_desc-roi_stat-reconerror_boldmap.json",
    f"{{sub}}_{ATLAS_ENTITIES}_desc-roi_stat-occlusion_boldmap.nii.gz",
    f"{{sub}}_{ATLAS_ENTITIES}_desc-roi_stat-occlusion_boldmap.json",
    f"{{sub}}_{ATLAS_ENTITIES}_desc-roi_attribution.tsv",
    f"{{sub}}_{ATLAS_ENTITIES}_desc-roi_stat-bygroup_attribution.tsv",
    f"{{sub}}_{ENTITIES}_desc-roi_embedding.json",   # the completion sidecar, written last
)
POLL_S = 0.002


def _start(stderr: Path, *argv: object) -> subprocess.Popen:
    """``roimae ARGV`` in a subprocess, its standard error to the file ``stderr``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(stderr, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "bidsapp", *map(str, argv)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def _finish(proc: subprocess.Popen, stderr: Path, timeout: float = 900) -> str:
    """Wait for ``proc``; check it succeeded and return its standard error."""
    proc.wait(timeout=timeout)
    err = stderr.read_text()
    assert proc.returncode == 0, err[-3000:]
    return err


def _kill_when(proc: subprocess.Popen, path: Path, stderr: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (fail if it ends or times out first)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before {path.name} appeared: "
                        f"{stderr.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(POLL_S)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _check_file(path: Path) -> None:
    """A file under its final name is whole: it parses."""
    if path.name.endswith(".tsv"):
        table = pd.read_csv(path, sep="\t", na_values="n/a")
        assert len(table) >= 1 and len(table.columns) >= 1, path
    elif path.name.endswith(".json"):
        assert isinstance(json.loads(path.read_text()), dict), path
    elif path.name.endswith(".nii.gz"):
        data = np.asanyarray(nib.load(path).dataobj)
        assert data.shape == (91, 109, 91), path


def _temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp*"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bids = tmp_path_factory.mktemp("crash") / "bids"
    make_demo_dataset(bids, n_participants=4, n_frames=20, seed=4)
    return bids


def test_participant_job_killed_while_writing_is_completed_by_a_rerun(demo: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main([str(demo), str(out), "pretrain", "--window-frames", "10", "--epochs", "1",
                 "--batch-size", "2", "--nprocs", "1"]) == 0
    model = out / "models/desc-roi/model.safetensors"
    command = [demo, out, "participant", "--participant-label", "01", "02", "--no-reports",
               "--omp-nthreads", "1"]
    func = {sub: out / f"sub-{sub}/func" for sub in ("01", "02")}
    files = {sub: [func[sub] / name.format(sub=f"sub-{sub}") for name in RUN_FILES]
             for sub in func}

    # Killed right after the first output of the first run appeared: mid-way through its files.
    log = tmp_path / "stderr.txt"
    _kill_when(_start(log, *command), files["01"][0], log)
    written = [p for sub in func for p in files[sub] if p.exists()]
    assert files["01"][0] in written
    assert files["02"][-1] not in written, "the job was not killed before its end"
    for path in written:
        _check_file(path)       # atomic writes: no half file under a final name

    _finish(_start(log, *command), log)
    for sub in func:
        for path in files[sub]:
            assert path.is_file(), path
            _check_file(path)
        sidecar = json.loads(files[sub][-1].read_text())
        assert sidecar["Model"]["SHA256"] == file_sha256(model)
        assert sidecar["NumberOfWindows"] == 2 and sidecar["Attribution"]["Regions"] == 166
        assert len(pd.read_csv(files[sub][0], sep="\t")) == 2
        assert len(pd.read_csv(files[sub][3], sep="\t", na_values="n/a")) == 166
    assert _temporaries(out) == []
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"


def test_pretraining_killed_mid_epoch_resumes_from_the_last_complete_checkpoint(
        demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    models = out / "models/desc-roi"
    command = [demo, out, "pretrain", "--window-frames", "10", "--batch-size", "2",
               "--epochs", "4", "--nprocs", "1", "--omp-nthreads", "1"]
    log = tmp_path / "stderr.txt"
    _kill_when(_start(log, *command), models / "epoch-001.json", log)
    assert not (models / "model.json").exists()
    for path in models.iterdir():
        if path.name.endswith((".json", ".tsv")):
            _check_file(path)

    err = _finish(_start(log, *command, "--resume"), log)
    assert "resuming from epoch-001" in err
    history = pd.read_csv(models / "training_log.tsv", sep="\t", na_values="n/a")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history["train_loss"].notna().all()
    meta = json.loads((models / "model.json").read_text())
    assert meta["epoch"] == 4 and meta["weights_sha256"] == file_sha256(models / "model.safetensors")
    assert sorted(p.name for p in models.glob("epoch-*.json")) == ["epoch-003.json", "epoch-004.json"]
    assert _temporaries(out) == []


@pytest.mark.parametrize(("signum", "code", "line"), [
    (signal.SIGTERM, 143, "stopped by SIGTERM"),
    (signal.SIGINT, 130, "interrupted (SIGINT)"),
])
def test_pretraining_stopped_by_a_signal_ends_with_one_line(demo: Path, tmp_path: Path,
                                                            signum: int, code: int,
                                                            line: str) -> None:
    """SIGTERM (Slurm's time limit, scancel) unwinds as Ctrl-C: one line, logged, no temporaries."""
    out = tmp_path / "out"
    models = out / "models/desc-roi"
    command = [demo, out, "pretrain", "--window-frames", "10", "--batch-size", "2",
               "--epochs", "6", "--nprocs", "1", "--omp-nthreads", "1"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        # SIGINT as the default (a test runner may ignore it, and children inherit that).
        proc = subprocess.Popen([sys.executable, "-m", "bidsapp", *map(str, command)],
                                env=dict(os.environ, OMP_NUM_THREADS="1"),
                                stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (models / "epoch-001.json").exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "epoch 1 did not end within 300 s"
        time.sleep(POLL_S)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"roimae: {line}; outputs completed so far are kept") and \
        last.endswith(f"(exit {code})"), last
    assert not (models / "model.json").exists()
    assert _temporaries(out) == []
    # The log file says it too (the console had it once, from the CLI).
    (log_file,) = (out / "logs").glob("roimae-pretrain-*.log")
    assert f"[ERROR] {line}" in log_file.read_text()
    assert err.count(line) == 1
    # And the run continues from its last checkpoint.
    _finish(_start(log, *command, "--epochs", "2", "--resume"), log)
    assert json.loads((models / "model.json").read_text())["epoch"] >= 2


def test_participant_job_stopped_by_sigterm_keeps_complete_runs_and_resumes(
        pretrained_demo, tmp_path: Path) -> None:
    """A Slurm time limit in the participant level: one line, complete runs kept, a rerun ends."""
    out = tmp_path / "out"
    command = [pretrained_demo.bids, out, "participant", "--model", pretrained_demo.model,
               "--no-reports", "--nprocs", "1", "--omp-nthreads", "1"]
    log = tmp_path / "stderr.txt"
    proc = _start(log, *command)
    done = "sub-*/func/*_desc-roi_embedding.json"   # a run's completion sidecar, written last
    deadline = time.monotonic() + 300
    while not list(out.glob(done)):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no run was completed within 300 s"
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("roimae: stopped by SIGTERM; outputs completed so far are kept"), last
    complete = sorted(p.name for p in out.glob(done))
    assert 1 <= len(complete) < 4, complete
    assert _temporaries(out) == []
    (log_file,) = (out / "logs").glob("roimae-participant-*.log")
    assert "[ERROR] stopped by SIGTERM" in log_file.read_text()
    # The rerun keeps the complete runs (same bytes) and does the rest.
    before = {name: file_sha256(next(out.glob(f"sub-*/func/{name}"))) for name in complete}
    _finish(_start(log, *command), log)
    assert len(list(out.glob(done))) == 4
    assert {name: file_sha256(next(out.glob(f"sub-*/func/{name}"))) for name in complete} == before
