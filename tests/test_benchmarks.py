"""The epoch benchmark runs end to end on a tiny synthetic cache."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import REPO_ROOT


def test_pretrain_epoch_benchmark_runs() -> None:
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "pretrain_epoch.py"), "--runs", "2",
               "--steps", "2", "--rounds", "1", "--frames", "8", "--window-frames", "4",
               "--batch-size", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1
    row = rows[0]
    assert row["benchmark"] == "pretrain-epoch" and row["runs"] == 2
    assert row["downsample"] == 2 and row["input_shape"] == [48, 48, 48]
    assert row["train_windows"] == 2 and row["held_out_windows"] >= 1
    for key in ("seconds_per_window", "epoch_seconds_per_window", "floor_seconds_per_window",
                "ratio", "peak_rss_mb", "peak_rss_mb_epochs", "cache_mb_per_run"):
        assert math.isfinite(row[key]) and row[key] > 0, key
