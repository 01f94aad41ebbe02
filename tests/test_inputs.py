"""Inputs that are accepted with a warning, or refused without the cost they would have had.

Companions of the bad-input matrix (tests/test_bad_input.py) for what a table row cannot check:
a warning on success, the memory a refused file did not take, and escaping in the reports.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bidsapp.cache import PreprocessParams
from bidsapp.cli import main
from bidsapp.logs import get_logger
from bidsapp.preprocess import prepare_run

ENTITIES = "task-rest_space-MNI152NLin6Asym_res-2"


def _bold(bids: Path, sub: str = "01") -> Path:
    return bids / f"sub-{sub}/func/sub-{sub}_{ENTITIES}_desc-preproc_bold.nii.gz"


def _mask(bids: Path, sub: str = "01") -> Path:
    return bids / f"sub-{sub}/func/sub-{sub}_{ENTITIES}_desc-brain_mask.nii.gz"


#: Leave no console handler on capsys's closed stream to the tests that follow.
pytestmark = pytest.mark.usefixtures("fresh_logging")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_sidecar_tr_in_milliseconds_is_used_with_a_warning(pretrained_demo, tmp_path: Path) -> None:
    """RepetitionTime 2000 (ms by mistake) against a 2 s header: the sidecar wins, loudly."""
    records = _Records()
    logger = get_logger()
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        run = prepare_run(_bold(pretrained_demo.bids), _mask(pretrained_demo.bids),
                          tmp_path / "cache", PreprocessParams(window_frames=10), 2000.0)
    finally:
        logger.removeHandler(records)
    assert run.repetition_time == 2000.0
    assert any("RepetitionTime 2000 s in its sidecar, but 2 s in the NIfTI header" in m
               for m in records.messages), records.messages


def test_a_header_claiming_32000_frames_allocates_nothing_for_them(pretrained_demo,
                                                                   tmp_path: Path) -> None:
    """Reading stops at the end of the data; 32,000 frames would have been a 26 GiB array."""
    bids = tmp_path / "bids"
    shutil.copytree(pretrained_demo.bids, bids)
    raw = bytearray(gzip.decompress(_bold(bids).read_bytes()))
    raw[48:50] = np.array([32_000], dtype="<i2").tobytes()   # dim[4]
    _bold(bids).write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    tracemalloc.start()
    try:
        code = main([str(bids), str(tmp_path / "out"), "participant", "--model",
                     str(pretrained_demo.model), "--participant-label", "01", "--no-reports",
                     "--no-attribution", "--omp-nthreads", "1"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 65
    assert peak < 2 * 2**30, f"{peak / 2**30:.1f} GiB traced"


def test_report_values_are_escaped(tmp_path: Path) -> None:
    from bidsapp.reports import write_participant_report

    evil = "<script>alert(1)</script>"
    meta = {"Model": {"Path": evil, "Backbone": evil, "Preset": evil, "Masking": evil,
                      "Epoch": evil, "SHA256": evil * 2},
            "Sources": [evil], "NumberOfWindows": evil, "WindowFrames": evil,
            "RepetitionTime": evil, "Attribution": None}
    outputs = SimpleNamespace(embedding=Path(f"{evil}.tsv"), done=tmp_path / "absent.json")
    atlas = SimpleNamespace(name=evil, regions=[0] * 3)
    report = write_participant_report(tmp_path, "01", [(evil, "roi", outputs, meta)], atlas)
    text = report.read_text()
    assert "<script>" not in text and text.count("&lt;script&gt;") >= 4
