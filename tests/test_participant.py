"""The participant level: outputs, determinism, resumability, parallel jobs and checkpoint safety."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PretrainedDemo

from bidsapp.cli import main

PREFIX = "task-rest_space-MNI152NLin6Asym_res-2"
#: Entities in BIDS order: ``atlas`` comes before ``res``.
ATLAS_PREFIX = "task-rest_space-MNI152NLin6Asym_atlas-AAL3v1_res-2"


@pytest.fixture
def pretrained(pretrained_demo: PretrainedDemo) -> tuple[Path, Path]:
    return pretrained_demo.bids, pretrained_demo.out


def _fresh_output(pretrained: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A new OUTPUT_DIR holding only the pretrained model (and the shared cache)."""
    bids, out = pretrained
    fresh = tmp_path / "out"
    shutil.copytree(out / "models", fresh / "models")
    return bids, fresh


def _participant(bids: Path, out: Path, *extra: str) -> int:
    return main([str(bids), str(out), "participant", "--no-reports", "--nprocs", "1",
                 "-w", str(out.parent / "work"), *extra])


def _embedding(out: Path, sub: str) -> pd.DataFrame:
    return pd.read_csv(out / f"sub-{sub}/func/sub-{sub}_{PREFIX}_desc-roi_stat-mean_embedding.tsv",
                       sep="\t")


def test_embeddings_are_identical_across_invocations(pretrained, tmp_path: Path) -> None:
    bids, out_a = _fresh_output(pretrained, tmp_path / "a")
    _, out_b = _fresh_output(pretrained, tmp_path / "b")
    assert _participant(bids, out_a, "--participant-label", "01") == 0
    assert _participant(bids, out_b, "--participant-label", "sub-01") == 0
    a, b = _embedding(out_a, "01"), _embedding(out_b, "01")
    assert np.array_equal(a.to_numpy(), b.to_numpy())
    windows = pd.read_csv(out_a / f"sub-01/func/sub-01_{PREFIX}_desc-roi_embedding.tsv", sep="\t")
    dims = [c for c in windows.columns if c.startswith("e")]
    np.testing.assert_allclose(windows[dims].mean().to_numpy(), a.to_numpy()[0], rtol=1e-6)
    occluded = pd.read_csv(out_a / f"sub-01/func/sub-01_{ATLAS_PREFIX}_desc-roi_"
                           "stat-occluded_embedding.tsv", sep="\t", na_values="n/a")
    assert occluded.shape == (166, 2 + len(dims))


def test_complete_runs_are_skipped_and_crashed_runs_redone(pretrained, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    bids, out = _fresh_output(pretrained, tmp_path)
    assert _participant(bids, out, "--participant-label", "02") == 0
    func = out / "sub-02/func"
    done = func / f"sub-02_{PREFIX}_desc-roi_embedding.json"
    table = func / f"sub-02_{ATLAS_PREFIX}_desc-roi_attribution.tsv"
    stamp = table.stat().st_mtime_ns
    assert _participant(bids, out, "--participant-label", "02") == 0
    assert table.stat().st_mtime_ns == stamp and "complete, skipped" in capsys.readouterr().err
    # A crash before the completion sidecar was written: the run is redone in full.
    done.unlink()
    table.unlink()
    assert _participant(bids, out, "--participant-label", "02") == 0
    assert done.is_file() and table.is_file()
    assert not list(out.rglob("*.tmp*"))
    stamp = table.stat().st_mtime_ns
    assert _participant(bids, out, "--participant-label", "02", "--overwrite") == 0
    assert table.stat().st_mtime_ns != stamp


def test_two_participant_jobs_at_once_into_one_output(pretrained, tmp_path: Path) -> None:
    bids, out = _fresh_output(pretrained, tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "bidsapp", str(bids), str(out), "participant",
                               "--participant-label", label, "--no-reports", "--omp-nthreads", "1",
                               "-w", str(tmp_path / "work")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for label in ("03", "04")]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    for sub in ("03", "04"):
        assert (out / f"sub-{sub}/func/sub-{sub}_{PREFIX}_desc-roi_embedding.json").is_file()
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert [g["Name"] for g in description["GeneratedBy"]] == ["roimae"]


def test_missing_model_is_explained(pretrained, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    bids, _ = pretrained
    assert _participant(bids, tmp_path / "empty") == 66
    assert "run `roimae BIDS_DIR OUTPUT_DIR pretrain` first" in capsys.readouterr().err


def test_pickled_checkpoint_is_refused_without_unpickling(pretrained, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    bids, out = pretrained
    marker = tmp_path / "pwned"
    # A pickle whose loading would create `marker`: roimae must never unpickle it.
    evil = tmp_path / "model.safetensors"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"weights": Payload()}, evil)
    shutil.copy(out / "models/desc-roi/model.json", tmp_path / "model.json")
    meta = json.loads((tmp_path / "model.json").read_text())
    meta.pop("weights_sha256")
    (tmp_path / "model.json").write_text(json.dumps(meta))
    code = _participant(bids, tmp_path / "o", "--model", str(evil))
    assert code == 65 and not marker.exists()
    assert "not a valid safetensors file" in capsys.readouterr().err
    torch_file = tmp_path / "model.pt"
    torch.save({}, torch_file)
    assert _participant(bids, tmp_path / "o", "--model", str(torch_file)) == 64


def test_truncated_and_mismatched_checkpoints_are_refused(pretrained, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    bids, out = pretrained
    for name in ("model.safetensors", "model.json"):
        shutil.copy(out / "models/desc-roi" / name, tmp_path / name)
    weights = tmp_path / "model.safetensors"
    assert _participant(bids, tmp_path / "o", "--model", str(weights), "--preset", "small") == 64
    assert "is a 'tiny' model" in capsys.readouterr().err
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert _participant(bids, tmp_path / "o", "--model", str(weights)) == 65
    assert "does not match the hash" in capsys.readouterr().err


def test_report_shows_every_complete_run_of_every_model(pretrained, tmp_path: Path) -> None:
    """The second model's job keeps the first one's runs; a job that skips everything writes it."""
    bids, out = _fresh_output(pretrained, tmp_path)
    # A second model: the same weights, declared as random masking (its own desc and folder).
    random_dir = out / "models/desc-random"
    random_dir.mkdir()
    shutil.copy(out / "models/desc-roi/model.safetensors", random_dir)
    meta = json.loads((out / "models/desc-roi/model.json").read_text())
    meta["masking"]["masking"] = "random"
    (random_dir / "model.json").write_text(json.dumps(meta))

    def participant(desc: str) -> None:
        assert main([str(bids), str(out), "participant", "--participant-label", "01",
                     "--model-desc", desc, "--nprocs", "1", "-w", str(tmp_path / "work")]) == 0

    def sections() -> list[str]:
        return re.findall(r"<h2>Model (desc-\w+)</h2>", (out / "sub-01.html").read_text())

    participant("roi")
    assert sections() == ["desc-roi"]
    participant("random")
    assert sections() == ["desc-random", "desc-roi"]
    report = (out / "sub-01.html").read_text()
    assert report.count(f"<h3>sub-01_{PREFIX}</h3>") == 2
    for image in re.findall(r"<img src='([^']+)'", report):
        assert (out / image).is_file(), image
    # Every run already complete: skipped, and the report is still written, with both models.
    (out / "sub-01.html").unlink()
    participant("roi")
    assert sections() == ["desc-random", "desc-roi"]
    # A run without its completion sidecar (a killed job) is not reported.
    (out / f"sub-01/func/sub-01_{PREFIX}_desc-random_embedding.json").unlink()
    participant("roi")
    assert sections() == ["desc-roi"]
