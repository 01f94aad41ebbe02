"""Shared test fixtures: paths to the read-only data in ``../shared`` (never copied here)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bidsapp.logs import reset_logging

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("ROIMAE_SHARED_DIR", REPO_ROOT.parent / "shared"))
# Set at import, not only per test, so that module- and session-scoped fixtures read the local
# copy too (nothing is ever downloaded in tests).
os.environ.setdefault("ROIMAE_ATLAS_DIR", str(SHARED_DIR / "atlas" / "aal3"))


def _own_cpus_per_worker() -> None:
    """Under pytest-xdist, give each worker (and every process it starts) its own CPUs.

    Otherwise each worker's PyTorch starts one OpenMP thread per CPU of the machine: two workers
    on 2 cores ran 4 spinning threads, and the demo chain took 30 min in CI instead of 9.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // count
    if share < 1:
        return
    index = int(worker.removeprefix("gw"))
    os.sched_setaffinity(0, cpus[index * share:(index + 1) * share])
    os.environ["OMP_NUM_THREADS"] = str(share)  # read by the processes tests start


_own_cpus_per_worker()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DIR} (set ROIMAE_SHARED_DIR)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def atlas_dir(shared_dir: Path) -> Path:
    return Path(os.environ.get("ROIMAE_ATLAS_DIR", shared_dir / "atlas" / "aal3"))


@pytest.fixture(scope="session")
def bids_examples(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "bids-examples"


@pytest.fixture(autouse=True)
def _atlas_env(monkeypatch: pytest.MonkeyPatch, atlas_dir: Path) -> None:
    """Every test reads AAL3 from the local copy; nothing is downloaded."""
    monkeypatch.setenv("ROIMAE_ATLAS_DIR", str(atlas_dir))


@dataclass(frozen=True)
class PretrainedDemo:
    """A demo dataset and the OUTPUT_DIR of one tiny ``roi`` pretraining on it."""

    bids: Path
    out: Path

    @property
    def model(self) -> Path:
        return self.out / "models" / "desc-roi" / "model.safetensors"


@pytest.fixture(scope="session")
def pretrained_demo(tmp_path_factory: pytest.TempPathFactory) -> PretrainedDemo:
    """4 participants x 20 frames, pretrained 1 epoch on 10-frame windows (2 per run).

    Shared by every test of a worker: read-only, tests copy what they change.
    """
    from bidsapp.cli import main
    from bidsapp.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("pretrained-demo")
    bids, out = root / "bids", root / "out"
    make_demo_dataset(bids, n_participants=4, n_frames=20, seed=2)
    assert main([str(bids), str(out), "pretrain", "--epochs", "1", "--window-frames", "10",
                 "--batch-size", "2", "--nprocs", "1", "--omp-nthreads", "1"]) == 0
    return PretrainedDemo(bids, out)


@pytest.fixture
def fresh_logging() -> Iterator[None]:
    """Close and drop roimae's console handlers after the test, so that no handler writes to the
    closed stream of an earlier test's capsys."""
    yield
    reset_logging()
