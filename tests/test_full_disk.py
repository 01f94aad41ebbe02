"""A full disk or quota: exit 74 with one line, nothing partial left, never a SIGBUS.

Each test mounts a size-limited tmpfs (``mount -t tmpfs -o size=...``) under ``tmp_path`` as the
work directory or OUTPUT_DIR, so the disk really fills up; where mounting is not permitted (not
root, no ``mount``, a container without CAP_SYS_ADMIN) the tests are skipped and say why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.cli import main
from bidsapp.demo import make_demo_dataset
from bidsapp.errors import IOFailureError
from bidsapp.io import atomic_write_text

matplotlib.use("Agg")

FAST = ["--window-frames", "10", "--epochs", "1", "--batch-size", "2", "--omp-nthreads", "1"]
FULL = "No space left on device"


#: Leave no console handler on capsys's closed stream to the tests that follow.
pytestmark = pytest.mark.usefixtures("fresh_logging")


def _mount_small_fs(path: Path, size: str) -> None:
    """Mount a tmpfs of ``size`` on ``path``, or skip the test with the reason."""
    path.mkdir(parents=True, exist_ok=True)
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("a size-limited file system needs Linux and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs",
                           str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{done.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator:
    """``small_fs(name, size)`` mounts a tmpfs of ``size`` at ``tmp_path / name``."""
    mounted: list[Path] = []

    def make(name: str, size: str) -> Path:
        path = tmp_path / name
        _mount_small_fs(path, size)
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full-disk") / "demo"
    make_demo_dataset(root, n_participants=4, n_frames=10, seed=0)
    return root


def _error_line(err: str) -> str:
    assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
    lines = err.splitlines()
    assert lines and lines[-1].startswith("roimae: error: "), err[-3000:]
    return lines[-1]


def _partial(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)


@pytest.mark.parametrize("nprocs", [1, 2])
def test_cache_on_a_full_disk_exits_74_and_leaves_no_partial_entry(
        demo: Path, tmp_path: Path, small_fs, nprocs: int,
        capsys: pytest.CaptureFixture[str]) -> None:
    # One demo cache entry (10 frames of about 70,000 brain voxels, float16) is over 1 MiB.
    work = small_fs("work", "512k")
    out = tmp_path / "out"
    code = main([str(demo), str(out), "pretrain", "-w", str(work), "--nprocs", str(nprocs),
                 *FAST])
    line = _error_line(capsys.readouterr().err)
    assert code == 74, line
    assert FULL in line and "cache" in line and "disk or the quota" in line
    # Nothing partial: no temporary entry and no entry at all, only the lock files.
    cache = work / "cache"
    assert _partial(work) == []
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == []
    assert sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) == 0
    assert not (out / "models").exists()


def test_checkpoint_on_a_full_disk_exits_74_with_no_weights_without_sidecar(
        demo: Path, tmp_path: Path, small_fs, capsys: pytest.CaptureFixture[str]) -> None:
    # Room for the log, dataset_description.json and the training log, not for the weights.
    out = small_fs("out", "96k")
    code = main([str(demo), str(out), "pretrain", "-w", str(tmp_path / "work"), *FAST])
    line = _error_line(capsys.readouterr().err)
    assert code == 74, line
    assert FULL in line and "epoch-001" in line
    models = out / "models" / "desc-roi"
    assert _partial(out) == []
    weights = sorted(p.stem for p in models.glob("*.safetensors"))
    sidecars = {p.stem for p in models.glob("*.json")}
    assert [w for w in weights if w.removesuffix("_optim") not in sidecars] == []
    assert not (models / "model.json").exists()


def test_every_writer_reports_a_full_disk_once(tmp_path: Path, small_fs) -> None:
    """TSV, NIfTI, JSON and figure writers all go through the atomic write: 74, no temporary."""
    import matplotlib.pyplot as plt
    import nibabel as nib

    from bidsapp.reports import save_figure

    out = small_fs("out", "16k")
    writer = DerivativesWriter(out)
    big = np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32)
    writes = {
        "tsv": lambda: writer.write_tsv(out / "a.tsv", pd.DataFrame(big.reshape(-1, 40))),
        "nifti": lambda: writer.write_nifti(out / "a.nii.gz", nib.Nifti1Image(big, np.eye(4))),
        "json": lambda: atomic_write_text(out / "a.json", "[" + "0," * 20000 + "0]"),
        "figure": lambda: save_figure(_noise_figure(plt, big), out / "a.png"),
    }
    for name, write in writes.items():
        with pytest.raises(IOFailureError, match=FULL) as error:
            write()
        assert "\n" not in str(error.value), name
        assert sorted(p.name for p in out.iterdir()) == [], name


def _noise_figure(plt, values: np.ndarray):
    fig, ax = plt.subplots(figsize=(12, 12), dpi=100)
    ax.imshow(values.reshape(320, 200), cmap="viridis")
    return fig
