"""Every benchmark runs end to end at a tiny size and prints finite JSON rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
    "subregional.py": ["--participants", "8", "--frames", "20", "--epochs", "1", "--maskings",
                       "roi", "--targets", "subregional", "--cv-folds", "2", "--cv-repeats", "1"],
}


def _rows(script: str, *extra: str) -> list[dict]:
    command = [sys.executable, str(BENCHMARKS / script), *QUICK_ARGUMENTS[script], *extra]
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


#: The benchmarks whose rows give FLOPs and their fraction of a peak (issue #25).
WITH_EFFICIENCY = {"backbones.py", "participant.py", "pretrain_step.py"}


@pytest.mark.parametrize("script", sorted(set(QUICK_ARGUMENTS) - {"pretrain_epoch.py"}))
def test_benchmark_prints_finite_rows(script: str) -> None:
    for row in _rows(script):
        assert _finite(row), row
        if script in WITH_EFFICIENCY:  # on the CPU: of the matmul rate measured in the same run
            assert row["flops"] > 0 and row["peak"] == "2048^2 float32 matmul, measured", row
            assert row["tflops"] > 0 and row["peak_tflops"] > 0, row
            assert row["fraction_of_peak"] == pytest.approx(row["tflops"] / row["peak_tflops"])
            # The bound of the counted operations alone: positive, above the row's own fraction.
            assert 0 < row["counted_ops_seconds"], row
            assert sum(op["flops"] for op in row["by_op"].values()) == row["flops"], row
            assert row["counted_ops_share"] < 1.5, row  # alone, no slower than in the row
            assert row["counted_ops_fraction_of_peak"] == pytest.approx(
                row["fraction_of_peak"] / row["counted_ops_share"])


def test_backbone_steps_in_bf16_on_the_cpu() -> None:
    from bidsapp.runtime import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("needs a CPU with bfloat16 instructions")
    rows = _rows("backbones.py", "--cpu-bf16", "--threads", "1")
    assert {(row["cpu_bf16"], row["threads"]) for row in rows} == {(True, 1)}


def test_flops_of_cpu_attention_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # PyTorch's counter has no formula for the CPU attention kernel: swin4d's attention counted 0.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch
    from _common import counted_ops

    def flops(fn: object) -> int:
        return sum(op["flops"] for op in counted_ops(fn, torch.device("cpu")).values())

    q = torch.randn(3, 2, 16, 8, requires_grad=True)  # (windows, heads, tokens, channels)
    mask = torch.ones(3, 1, 16, 16, dtype=torch.bool)
    attention = torch.nn.functional.scaled_dot_product_attention
    forward = 2 * (2 * 3 * 2 * 16 * 16 * 8)  # q k^T, then the weights times v
    with torch.no_grad():
        assert flops(lambda: attention(q, q, q, attn_mask=mask)) == forward
    # The backward recomputes q k^T and takes four more products of the same size.
    assert flops(lambda: attention(q, q, q, attn_mask=mask).sum().backward()) == 3.5 * forward


def test_counted_operations_are_replayed_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the matrix products and attention are replayed: the rest of the step costs nothing.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import time

    import torch
    from _common import counted_ops

    a = torch.randn(64, 64)
    q = torch.randn(2, 1, 16, 8)
    calls = []

    def step() -> None:
        calls.append(1)
        time.sleep(0.5)  # not an operation PyTorch counts
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        (a @ a).relu()

    ops = counted_ops(step, torch.device("cpu"))
    assert calls == [1]  # the step itself runs once; its operations are replayed
    assert {name: op["calls"] for name, op in ops.items()} == {
        "aten._scaled_dot_product_flash_attention_for_cpu": 1, "aten.mm": 1}
    assert ops["aten.mm"]["flops"] == 2 * 64**3
    assert 0 < sum(op["seconds_alone"] for op in ops.values()) < 0.1
    # Under inference mode (the participant level's passes) composite operations reach the
    # recorder undecomposed; they are decomposed into the counted ones.
    linear = torch.nn.Linear(64, 32)
    inference = counted_ops(torch.inference_mode()(lambda: linear(a) @ a[:32]), torch.device("cpu"))
    assert {name: op["flops"] for name, op in inference.items()} == {
        "aten.addmm": 2 * 64 * 64 * 32, "aten.mm": 2 * 64 * 32 * 64}


def test_pretrain_epoch_benchmark_runs() -> None:
    rows = _rows("pretrain_epoch.py")
    assert len(rows) == 1
    row = rows[0]
    assert row["benchmark"] == "pretrain-epoch" and row["runs"] == 2
    assert row["downsample"] == 2 and row["input_shape"] == [48, 48, 48]
    assert row["train_windows"] == 2 and row["held_out_windows"] >= 1
    for key in ("seconds_per_window", "epoch_seconds_per_window", "floor_seconds_per_window",
                "ratio", "peak_rss_mb", "peak_rss_mb_epochs", "cache_mb_per_run",
                "load_seconds_per_window", "trainer_in_memory_seconds_per_window",
                "epoch_end_seconds", "pretrain_epoch_seconds_per_window"):
        assert math.isfinite(row[key]) and row[key] > 0, key


def test_pretrain_epoch_benchmark_runs_on_a_bids_dataset(tmp_path: Path) -> None:
    # --bids: every window of the runs of a derivatives dataset, preprocessed as pretrain does.
    from bidsapp.demo import make_demo_dataset

    make_demo_dataset(tmp_path / "bids", n_participants=4, n_frames=8, seed=0)
    rows = _rows("pretrain_epoch.py", "--bids", str(tmp_path / "bids"), "--steps", "0")
    assert len(rows) == 1
    row = rows[0]
    assert row["runs"] == 4 and row["train_runs"] == 3 and row["held_out_runs"] == 1
    assert row["train_windows"] == 6 and row["held_out_windows"] == 2  # 2 windows of 4 frames
    assert row["cache"] == "preprocessed from bids (4 participants)"
    for key in ("seconds_per_window", "floor_seconds_per_window", "load_seconds_per_window",
                "trainer_in_memory_seconds_per_window", "held_out_seconds_per_window",
                "epoch_end_seconds", "pretrain_epoch_ratio", "cache_write_seconds"):
        assert math.isfinite(row[key]) and row[key] > 0, key


def test_a_benchmark_child_that_fails_fails_the_benchmark(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, a child that raised left in_child waiting on its queue forever (CI timed out).
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the spawned child imports _common too
    from _common import in_child

    with pytest.raises(ValueError, match="math domain error"):
        in_child(math.sqrt, -1.0)


def test_gpu_suite_runs_quick_on_the_cpu(tmp_path: Path) -> None:
    # benchmarks/gpu.sh fills the GPU rows of docs/performance.md; --quick runs every step of it.
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "--quick", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:] + (out / "gpu.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert all(_finite(row) for row in rows)
    steps = {(r["backbone"], r["compile"], r["world_size"]) for r in rows
             if r["benchmark"] == "backbone-step"}
    assert steps == {("swin4d", False, 1), ("vit4d", False, 1), ("swin4d", True, 1),
                     ("vit4d", True, 1), ("swin4d", False, 2)}
    assert {r["benchmark"] for r in rows} == {"backbone-step", "pretrain-step", "participant",
                                              "backbone-forward", "real_signal",
                                              "real_signal_timings"}
    forward = {r["backbone"]: r for r in rows if r["benchmark"] == "backbone-forward"}
    assert set(forward) == {"swin4d", "swin4d-mae", "swift", "neurostorm", "neurostorm-mae"}
    assert forward["neurostorm"]["n_parameters"] == 5_173_020 and forward["swin4d"]["ratio_to_swin4d"] == 1
    # roi vs random on the real signals, beside the baselines, on the same folds.
    scored = {r["set"] for r in rows if r["benchmark"] == "real_signal"}
    assert {"roi-global", "random-global", "fc", "tangent", "covariates"} <= scored
    ddp = next(r for r in rows if r.get("world_size") == 2)
    assert ddp["device"] == "cpu" and ddp["samples_per_second"] > 0
    # A second run never overwrites the first one's rows.
    again = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "--quick", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 64 and "already exists" in again.stderr
    assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)
