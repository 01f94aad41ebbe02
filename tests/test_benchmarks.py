"""Every benchmark runs end to end at a tiny size and prints finite JSON rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"

#: Each benchmark with arguments small enough for a few seconds on 2 cores.
QUICK_ARGUMENTS = {
    "baselines_real.py": ["--cv-folds", "2", "--cv-repeats", "1", "--participants", "10"],
    "backbones.py": ["--presets", "tiny", "--backbones", "swin4d", "vit4d", "--batch-size", "1",
                     "--frames", "10", "--steps", "1", "--warmup", "1"],
    "cache_precision.py": ["--frames", "40"],
    "group.py": ["--participants", "40", "--permutations", "20", "--dims", "8"],
    "participant.py": ["--frames", "40", "--presets", "tiny", "--subsets", "2", "--repeats", "1"],
    "preprocess.py": ["--frames", "40", "--repeats", "1"],
    "pretrain_step.py": ["--presets", "tiny", "--maskings", "roi", "--batch-size", "1",
                         "--window-frames", "5", "--steps", "1", "--rounds", "1"],
    "pretrain_epoch.py": ["--runs", "2", "--steps", "2", "--rounds", "1", "--frames", "8",
                          "--window-frames", "4", "--batch-size", "1"],
}


def _rows(script: str) -> list[dict]:
    command = [sys.executable, str(BENCHMARKS / script), *QUICK_ARGUMENTS[script]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows, done.stdout[-2000:]
    return rows


def _finite(value: object) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def test_every_benchmark_is_tested() -> None:
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    # real_signal.py has its own test (tests/test_real_signal.py).
    assert scripts - {"real_signal.py"} == set(QUICK_ARGUMENTS)


@pytest.mark.parametrize("script", sorted(set(QUICK_ARGUMENTS) - {"pretrain_epoch.py"}))
def test_benchmark_prints_finite_rows(script: str) -> None:
    for row in _rows(script):
        assert _finite(row), row


def test_pretrain_epoch_benchmark_runs() -> None:
    rows = _rows("pretrain_epoch.py")
    assert len(rows) == 1
    row = rows[0]
    assert row["benchmark"] == "pretrain-epoch" and row["runs"] == 2
    assert row["downsample"] == 2 and row["input_shape"] == [48, 48, 48]
    assert row["train_windows"] == 2 and row["held_out_windows"] >= 1
    for key in ("seconds_per_window", "epoch_seconds_per_window", "floor_seconds_per_window",
                "ratio", "peak_rss_mb", "peak_rss_mb_epochs", "cache_mb_per_run"):
        assert math.isfinite(row[key]) and row[key] > 0, key


def test_a_benchmark_child_that_fails_fails_the_benchmark(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, a child that raised left in_child waiting on its queue forever (CI timed out).
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the spawned child imports _common too
    from _common import in_child

    with pytest.raises(ValueError, match="math domain error"):
        in_child(math.sqrt, -1.0)
