"""Eight participant jobs started at once on one OUTPUT_DIR, as a Slurm array runs them.

They share the output directory (``dataset_description.json``, ``.bidsignore``, ``logs/``) and the
work directory's cache; each must finish, and the shared files must come out whole and merged once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest

from bidsapp.bids.validation import run_bids_validator
from bidsapp.cli import main
from bidsapp.demo import make_demo_dataset

pytestmark = pytest.mark.slow

N_JOBS = 8
ENTITIES = "task-rest_space-MNI152NLin6Asym_res-2"
ATLAS_ENTITIES = "task-rest_space-MNI152NLin6Asym_atlas-AAL3v1_res-2"
RUN_FILES = (
    *(f"{{sub}}_{ENTITIES}_desc-roi_{name}" for name in (
        "embedding.tsv", "embedding.json", "stat-mean_embedding.tsv", "stat-mean_embedding.json")),
    *(f"{{sub}}_{ATLAS_ENTITIES}_desc-roi_{name}" for name in (
        "stat-occluded_embedding.tsv", "attribution.tsv", "attribution.json",
        "stat-bygroup_attribution.tsv",
        "stat-reconerror_boldmap.nii.gz", "stat-reconerror_boldmap.json",
        "stat-occlusion_boldmap.nii.gz", "stat-occlusion_boldmap.json")),
    # The region readouts, and the connectivity baseline (no desc: it does not depend on the model).
    *(f"{{sub}}_{ATLAS_ENTITIES}_desc-roi_{name}" for name in (
        "stat-region_embedding.tsv", "stat-region_embedding.json",
        "stat-subregion_embedding.tsv", "stat-subregion_embedding.json",
        "stat-inputsubregion_embedding.tsv", "stat-inputsubregion_embedding.json",
        "stat-pearsoncorrelation_relmat.tsv", "stat-pearsoncorrelation_relmat.json")),
    *(f"{{sub}}_{ATLAS_ENTITIES}_{name}" for name in (
        "stat-mean_timeseries.tsv", "stat-mean_timeseries.json",
        "stat-pearsoncorrelation_relmat.tsv", "stat-pearsoncorrelation_relmat.json")),
)


@pytest.fixture(scope="module")
def array_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """Pretrain once, then run the eight participant jobs at once; return (bids, out, results)."""
    root = tmp_path_factory.mktemp("array")
    bids, out = root / "bids", root / "out"
    make_demo_dataset(bids, n_participants=N_JOBS, n_frames=10, seed=5)
    assert main([str(bids), str(out), "pretrain", "--window-frames", "10", "--epochs", "1",
                 "--batch-size", "2", "--nprocs", "1"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    labels = [f"{i:02d}" for i in range(1, N_JOBS + 1)]
    jobs = []
    for label in labels:
        with open(root / f"stderr-{label}.txt", "w") as err:
            jobs.append(subprocess.Popen(
                [sys.executable, "-m", "bidsapp", str(bids), str(out), "participant",
                 "--participant-label", label, "--no-reports", "--omp-nthreads", "1",
                 "--attribution-subsets", "2"], env=env, stdout=subprocess.DEVNULL, stderr=err))
    results = []
    for label, job in zip(labels, jobs, strict=True):
        job.wait(timeout=900)
        results.append((label, job.returncode, (root / f"stderr-{label}.txt").read_text()))
    return bids, out, results


def test_every_job_finishes_with_all_its_outputs(array_output) -> None:
    _, out, results = array_output
    for label, code, err in results:
        assert code == 0, f"sub-{label}: {err[-3000:]}"
    for label, _, _ in results:
        func = out / f"sub-{label}" / "func"
        names = sorted(p.name for p in func.iterdir())
        assert names == sorted(n.format(sub=f"sub-{label}") for n in RUN_FILES)
        done = json.loads((func / f"sub-{label}_{ENTITIES}_desc-roi_embedding.json").read_text())
        assert done["NumberOfWindows"] == 1 and done["Attribution"]["Subsets"] == 2
        table = pd.read_csv(func / RUN_FILES[5].format(sub=f"sub-{label}"), sep="\t",
                            na_values="n/a")
        assert len(table) == 166
        assert nib.load(func / RUN_FILES[8].format(sub=f"sub-{label}")).shape == (91, 109, 91)
    assert sorted(p.name for p in out.rglob("*.tmp*")) == []
    # Every job kept its own log and configuration.
    assert len(list((out / "logs").glob("roimae-participant-*_config.json"))) == N_JOBS
    assert len(list((out / "logs").glob("roimae-participant-*.log"))) == N_JOBS


def test_shared_files_are_written_once_and_whole(array_output) -> None:
    _, out, _ = array_output
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert [g["Name"] for g in description["GeneratedBy"]] == ["roimae"]
    assert len(description["SourceDatasets"]) == 1
    lines = (out / ".bidsignore").read_text().splitlines()
    assert len(lines) == len(set(lines))
    assert {"models", "logs", "*_embedding.tsv", "*_boldmap.nii.gz"} <= set(lines)


def test_output_passes_the_bids_validator(array_output) -> None:
    _, out, _ = array_output
    errors = [i for i in run_bids_validator(out) if i.severity == "error"]
    assert errors == []
