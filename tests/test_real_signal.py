"""The reduced real-signal benchmark: real region signals and real labels through roimae's own code.

``benchmarks/real_signal.py`` on 24 participants of ``../shared/realdata/development_fmri`` (12
children, 12 adults; real AAL116 signals painted into 4 mm pseudo-volumes): pretrain ``tiny`` for
one epoch on 4 of them, the participant level, and the group level scoring the model's
connectivity readout beside the ``fc``, ``tangent`` and ``covariates`` baselines on the same
folds. What it
must recover is known: child vs adult is visible in functional connectivity (balanced accuracy
about 0.88 on all 155 participants), and not in sex and handedness.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("real-signal")
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "real_signal.py"), str(work),
               "--realdata", str(shared_dir / "realdata" / "development_fmri"),
               "--per-class", "12", "--epochs", "1", "--pretrain-participants", "4",
               "--maskings", "roi", "--features", "connectivity", "--cv-repeats", "2",
               "--n-permutations", "50"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    emitted = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    scores = pd.read_csv(work / "out/group/target-ChildAdult_scores.tsv", sep="\t",
                         na_values="n/a")
    assert len(scores) == 4  # the roi readout, fc, tangent, covariates
    return {row.get("set", row["benchmark"]): row for row in emitted}


@pytest.mark.parametrize("baseline", ["fc", "tangent"])
def test_fc_baselines_recover_child_vs_adult(rows: dict[str, dict], baseline: str) -> None:
    fc = rows[baseline]
    assert fc["participants"] == 24
    assert fc["balanced_accuracy"] >= 0.75, fc
    assert fc["permutation_p"] <= 0.05, fc


def test_covariates_floor_is_near_chance(rows: dict[str, dict]) -> None:
    covariates = rows["covariates"]
    assert covariates["balanced_accuracy"] < rows["fc"]["balanced_accuracy"] - 0.15, covariates
    best = max(("fc", "tangent"), key=lambda name: rows[name]["balanced_accuracy"])
    assert rows["fc"]["best_baseline"] == best


def test_model_readout_is_scored_against_the_best_baseline(rows: dict[str, dict]) -> None:
    roi = rows["roi-connectivity"]
    best = max(("fc", "tangent"), key=lambda name: rows[name]["balanced_accuracy"])
    assert roi["kind"] == "model" and roi["best_baseline"] == best
    assert roi["features"] == rows["fc"]["features"]   # the same region pairs
    assert 0 <= roi["balanced_accuracy"] <= 1 and 0 <= roi["p_corrected"] <= 1
    assert rows["real_signal_timings"]["group_seconds"] > 0
