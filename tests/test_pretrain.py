"""The pretrain level: learning, exact resume, checkpoints, torchrun (DDP on CPU), device choice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from bidsapp.cache import load_cached
from bidsapp.cli import main
from bidsapp.demo import make_demo_dataset
from bidsapp.io import json_text
from bidsapp.runtime import cpu_has_bf16

COMMON = ["--window-frames", "10", "--batch-size", "2", "--random-seed", "3", "--nprocs", "1"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bids = tmp_path_factory.mktemp("demo") / "bids"
    make_demo_dataset(bids, n_participants=4, n_frames=20, seed=1)
    return bids


def _pretrain(bids: Path, out: Path, *extra: str) -> int:
    return main([str(bids), str(out), "pretrain", *COMMON, *extra])


def test_resume_after_epoch_1_equals_uninterrupted_run(small_demo: Path, tmp_path: Path) -> None:
    """Stopping after epoch 1 and resuming to epoch 3 gives bit-identical weights (CPU)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _pretrain(small_demo, straight, "--epochs", "3") == 0
    assert _pretrain(small_demo, resumed, "--epochs", "1") == 0
    assert _pretrain(small_demo, resumed, "--epochs", "3", "--resume") == 0
    a = load_file(straight / "models/desc-roi/model.safetensors")
    b = load_file(resumed / "models/desc-roi/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = pd.read_csv(resumed / "models/desc-roi/training_log.tsv", sep="\t")
    assert log["epoch"].tolist() == [1, 2, 3]
    # Only the last two epoch checkpoints are kept; each is complete (weights, optimizer, sidecar).
    kept = sorted(p.name for p in (resumed / "models/desc-roi").glob("epoch-*.json"))
    assert kept == ["epoch-002.json", "epoch-003.json"]
    meta = json.loads((resumed / "models/desc-roi/model.json").read_text())
    assert meta["epoch"] == 3 and meta["preset"]["name"] == "tiny"
    assert meta["masking"]["masking"] == "roi"
    assert meta["atlas"]["n_regions"] == 166
    assert len(meta["data"]) == 4 and all(len(d["sha256"]) == 64 for d in meta["data"])
    assert (resumed / "models/desc-roi/loss_curve.png").stat().st_size > 1000


def test_two_epochs_then_participant_share_a_cache_at_working_resolution(small_demo: Path,
                                                                          tmp_path: Path) -> None:
    """tiny (downsample 2): runs are cached at 48^3 once, and the participant level reuses them."""
    out, work = tmp_path / "out", tmp_path / "work"
    assert _pretrain(small_demo, out, "--epochs", "2", "-w", str(work)) == 0
    log = pd.read_csv(out / "models/desc-roi/training_log.tsv", sep="\t")
    assert log["epoch"].tolist() == [1, 2] and np.isfinite(log["train_loss"]).all()
    entries = sorted(p for p in (work / "cache").iterdir() if not p.name.startswith("."))
    assert len(entries) == 4
    for entry in entries:
        run = load_cached(entry)
        assert run.downsample == 2 and run.shape == (48, 48, 48) and run.window(0).shape == (
            10, 48, 48, 48)
    assert main([str(small_demo), str(out), "participant", "--no-reports", "--nprocs", "1",
                 "--participant-label", "01", "-w", str(work)]) == 0
    assert sorted(p for p in (work / "cache").iterdir() if not p.name.startswith(".")) == entries
    embedding = next(out.rglob("sub-01_*desc-roi_embedding.tsv"))
    assert np.isfinite(pd.read_csv(embedding, sep="\t").filter(regex="^e").to_numpy()).all()
    timeseries = pd.read_csv(next(out.rglob("sub-01_*timeseries.tsv")), sep="\t",
                             na_values="n/a")
    assert timeseries.shape == (20, 166) and np.isfinite(timeseries.to_numpy()).mean() > 0.9


def test_resume_from_a_crash_mid_save_uses_last_complete_checkpoint(small_demo: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _pretrain(small_demo, out, "--epochs", "2") == 0
    model_dir = out / "models/desc-roi"
    # A crash while writing epoch 2: its weights exist but its sidecar (written last) does not.
    (model_dir / "epoch-002.json").unlink()
    assert _pretrain(small_demo, out, "--epochs", "2", "--resume") == 0
    log = pd.read_csv(model_dir / "training_log.tsv", sep="\t")
    assert log["epoch"].tolist() == [1, 2]
    assert (model_dir / "epoch-002.json").is_file()


def test_resume_refuses_another_masking_setup(small_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _pretrain(small_demo, out, "--epochs", "1") == 0
    assert _pretrain(small_demo, out, "--epochs", "2", "--resume", "--mask-ratio", "0.3") == 64


def test_overwrite_replaces_the_model_and_clears_its_checkpoints(small_demo: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "out"
    model_dir = out / "models/desc-roi"
    assert _pretrain(small_demo, out, "--epochs", "3") == 0
    first = (model_dir / "model.safetensors").read_bytes()
    assert _pretrain(small_demo, out, "--epochs", "1") == 64          # refused: it holds a model
    assert (model_dir / "model.safetensors").read_bytes() == first
    assert _pretrain(small_demo, out, "--epochs", "1", "--random-seed", "4", "--overwrite") == 0
    # Nothing of the first run is left to be pruned in the wrong order or resumed later.
    assert sorted(p.name for p in model_dir.glob("epoch-*")) == [
        "epoch-001.json", "epoch-001.safetensors", "epoch-001_optim.safetensors"]
    assert pd.read_csv(model_dir / "training_log.tsv", sep="\t")["epoch"].tolist() == [1]
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["epoch"] == 1 and meta["random_seed"] == 4
    # --resume continues this run: the seed it records is the one it must be given.
    assert _pretrain(small_demo, out, "--epochs", "2", "--resume") == 64
    assert _pretrain(small_demo, out, "--epochs", "2", "--resume", "--random-seed", "4") == 0


def _strict_json(text: str) -> dict:
    """Parse as the JSON standard does: NaN and Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_json_outputs_write_null_for_non_finite_values(small_demo: Path, tmp_path: Path) -> None:
    # One participant: no held-out set, so the held-out loss is NaN in the training log.
    out = tmp_path / "out"
    assert _pretrain(small_demo, out, "--epochs", "1", "--participant-label", "01") == 0
    for name in ("model.json", "epoch-001.json"):
        meta = _strict_json((out / "models/desc-roi" / name).read_text())
        assert meta["metrics"]["val_loss"] is None and meta["metrics"]["train_loss"] > 0
    log = pd.read_csv(out / "models/desc-roi/training_log.tsv", sep="\t", keep_default_na=False)
    assert log["val_loss"].tolist() == ["n/a"]
    # The same writer for every JSON file roimae writes.
    assert json_text({"a": float("nan"), "b": [np.float32("inf"), -np.inf], "c": np.int64(2),
                      "d": np.array([1.5, np.nan])}) == \
        '{"a": null, "b": [null, null], "c": 2, "d": [1.5, null]}'


def test_maskings_sit_side_by_side(small_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _pretrain(small_demo, out, "--epochs", "1", "--masking", "brain-random") == 0
    assert _pretrain(small_demo, out, "--epochs", "1", "--masking", "roi-voxel") == 0
    assert sorted(p.name for p in (out / "models").iterdir()) == ["desc-brainrandom",
                                                                  "desc-roivoxel"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert "models" in (out / ".bidsignore").read_text().splitlines()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_device_cuda_without_gpu_exits_64(small_demo: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    assert _pretrain(small_demo, tmp_path / "out", "--device", "cuda") == 64
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]


def test_cpu_bf16_without_bf16_instructions_exits_64(small_demo: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("bidsapp.runtime.cpu_has_bf16", lambda: False)
    assert _pretrain(small_demo, tmp_path / "out", "--device", "cpu", "--cpu-bf16") == 64
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bfloat16 instructions" in err[0], err
    assert not (tmp_path / "out" / "models").exists()


@pytest.mark.skipif(not cpu_has_bf16(), reason="needs a CPU with bfloat16 instructions")
def test_cpu_bf16_trains_as_float32_does(small_demo: Path, tmp_path: Path) -> None:
    """--cpu-bf16 follows the float32 run's losses within 2% and says so in the model."""
    assert _pretrain(small_demo, tmp_path / "float32", "--epochs", "2") == 0
    assert _pretrain(small_demo, tmp_path / "bf16", "--epochs", "2", "--cpu-bf16") == 0
    logs = {run: pd.read_csv(tmp_path / run / "models/desc-roi/training_log.tsv", sep="\t")
            for run in ("float32", "bf16")}
    for column in ("train_loss", "val_loss"):
        np.testing.assert_allclose(logs["bf16"][column], logs["float32"][column], rtol=0.02)
    meta = json.loads((tmp_path / "bf16/models/desc-roi/model.json").read_text())
    assert meta["training"]["cpu_bf16"] is True


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(small_demo: Path, tmp_path: Path) -> None:
    """The same command under torchrun trains with DDP (gloo) and rank 0 writes one checkpoint."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", "29517", "-m", "bidsapp",
         str(small_demo), str(out), "pretrain", "--epochs", "1", *COMMON],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "models/desc-roi/model.json").read_text())
    assert meta["epoch"] == 1
    weights = load_file(out / "models/desc-roi/model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert len(list((out / "logs").glob("*_config.json"))) == 1


@pytest.mark.slow
def test_torch_compile_trains_the_same_model(small_demo: Path, tmp_path: Path) -> None:
    """--torch-compile (inductor, here on the CPU) gives the eager run's weights, under the same
    parameter names, so its checkpoints load anywhere."""
    assert _pretrain(small_demo, tmp_path / "eager", "--epochs", "1") == 0
    assert _pretrain(small_demo, tmp_path / "compiled", "--epochs", "1", "--torch-compile") == 0
    eager = load_file(tmp_path / "eager/models/desc-roi/model.safetensors")
    compiled = load_file(tmp_path / "compiled/models/desc-roi/model.safetensors")
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-5, rtol=1e-4)
    meta = json.loads((tmp_path / "compiled/models/desc-roi/model.json").read_text())
    assert "torch_compile" not in meta["training"]  # a run setting, not a property of the model
