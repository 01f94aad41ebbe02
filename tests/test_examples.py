"""The scripts in ``examples/`` run on the small demo (executed as scripts, in this process)."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, PretrainedDemo

EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(monkeypatch: pytest.MonkeyPatch, script: str, *args: object) -> None:
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def _run_files(bids: Path, sub: str) -> tuple[Path, Path]:
    stem = bids / f"sub-{sub}/func/sub-{sub}_task-rest_space-MNI152NLin6Asym_res-2_desc-"
    return Path(f"{stem}preproc_bold.nii.gz"), Path(f"{stem}brain_mask.nii.gz")


def test_embed_images(pretrained_demo: PretrainedDemo, monkeypatch: pytest.MonkeyPatch,
                      tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    imgs = [_run_files(pretrained_demo.bids, sub)[0] for sub in ("01", "02")]
    _run(monkeypatch, "embed_images.py", pretrained_demo.model, *imgs, "--out", tmp_path / "e.tsv")
    lines = (tmp_path / "e.tsv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("image\twindows\te000")
    assert "roi masking" in capsys.readouterr().out


def test_cross_validated_pipeline(pretrained_demo: PretrainedDemo,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    _run(monkeypatch, "cross_validated_pipeline.py", pretrained_demo.model, pretrained_demo.bids)
    assert "balanced accuracy" in capsys.readouterr().out


def test_plot_attribution(pretrained_demo: PretrainedDemo, monkeypatch: pytest.MonkeyPatch,
                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bold, mask = _run_files(pretrained_demo.bids, "03")
    _run(monkeypatch, "plot_attribution.py", pretrained_demo.model, bold, mask, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 10_000
    assert "best reconstructed regions" in capsys.readouterr().out
