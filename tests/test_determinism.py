"""Determinism on CPU: one seed gives bit-identical participant outputs, whatever the parallelism.

``tests/test_participant.py`` checks two identical invocations. Here the same participants are
processed from scratch (a fresh OUTPUT_DIR and cache each time) with ``--nprocs 1`` and ``2`` (the
cache is then built by a process pool) and ``--omp-nthreads 1`` and ``2`` (PyTorch's intra-op
threads), and every number written must be the same bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PretrainedDemo

from bidsapp.cli import main

SUBJECTS = ("01", "02")


@pytest.fixture
def pretrained(pretrained_demo: PretrainedDemo) -> tuple[Path, Path]:
    return pretrained_demo.bids, pretrained_demo.model


def _outputs(pretrained: tuple[Path, Path], out: Path, *options: str) -> dict[str, np.ndarray]:
    """Run the participant level into a new OUTPUT_DIR; return every table and map it wrote."""
    bids, model = pretrained
    assert main([str(bids), str(out), "participant", "--model", str(model), "--no-reports",
                 "--participant-label", *SUBJECTS, "--attribution-subsets", "2", *options]) == 0
    values = {}
    for path in sorted(out.glob("sub-*/func/*")):
        if path.name.endswith(".tsv"):
            table = pd.read_csv(path, sep="\t", na_values="n/a")
            values[path.name] = table.select_dtypes("number").to_numpy()
        elif path.name.endswith(".nii.gz"):
            values[path.name] = np.asanyarray(nib.load(path).dataobj)
    for path in sorted(out.glob(".roimae-work/cache/*/data.npy")):
        values[f"cache {path.parent.name}"] = np.load(path)
    assert sum(name.endswith("_stat-mean_embedding.tsv") for name in values) == len(SUBJECTS)
    return values


def _assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not np.array_equal(a[name], b[name], equal_nan=True)]
    assert different == [], f"{what}: not bit-identical: {different}"


@pytest.mark.slow
def test_same_seed_same_outputs_across_runs_processes_and_threads(pretrained,
                                                                  tmp_path: Path) -> None:
    reference = _outputs(pretrained, tmp_path / "ref", "--nprocs", "1", "--omp-nthreads", "1")
    for name, options in {
        "a second run": ("--nprocs", "1", "--omp-nthreads", "1"),
        "--nprocs 2": ("--nprocs", "2", "--omp-nthreads", "1"),
        "--omp-nthreads 2": ("--nprocs", "1", "--omp-nthreads", "2"),
    }.items():
        out = tmp_path / name.replace(" ", "_").replace("-", "")
        _assert_identical(reference, _outputs(pretrained, out, *options), name)
        assert torch.get_num_threads() == int(options[-1])   # the setting took effect
        shutil.rmtree(out)


def test_another_seed_changes_only_the_attribution(pretrained, tmp_path: Path) -> None:
    first = _outputs(pretrained, tmp_path / "a", "--random-seed", "0")
    second = _outputs(pretrained, tmp_path / "b", "--random-seed", "1")
    for name in first:
        same = np.array_equal(first[name], second[name], equal_nan=True)
        # The embeddings, readouts and the connectivity baseline see the whole brain; the
        # attribution draws random region subsets.
        assert same == (name.startswith("cache") or "desc-roi_embedding" in name
                        or "stat-mean_embedding" in name or "stat-region_embedding" in name
                        or name.endswith("subregion_embedding.tsv")
                        or name.endswith(("_relmat.tsv", "_timeseries.tsv"))), name
