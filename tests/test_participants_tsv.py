"""participants.tsv as users write it: padded ids, ids without ``sub-``, tables only the group reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from bidsapp.bids.layout import discover_runs, runs_without_row
from bidsapp.bids.participants import read_participants
from bidsapp.cli import build_parser, config_from_args, main
from bidsapp.errors import BadDataError


def test_ids_are_stripped_and_prefixed(tmp_path: Path) -> None:
    tsv = tmp_path / "participants.tsv"
    tsv.write_text("participant_id \tage\tdiagnosis\n"
                   "sub-01 \t34\tadhd\n"
                   "  sub-02\t38\tcontrol\n"
                   "03\tn/a\tadhd\n"
                   "n/a\t20\tcontrol\n")
    table = read_participants(tsv)
    assert table["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert table["age"].tolist()[:2] == [34, 38] and pd.isna(table["age"][2])
    assert table["diagnosis"].tolist() == ["adhd", "control", "adhd"]


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (b"participant_id\tdx\nsub-01\ta\nsub-01 \tb\n", "sub-01 on more than one row"),
    ("participant_id\tsite\nsub-01\tZ\u00fcrich\n".encode("latin-1"), "is not UTF-8 text"),
    (b"subject\tdx\nsub-01\ta\n", "has no participant_id column"),
])
def test_unusable_tables_are_one_line_of_bad_data(tmp_path: Path, content: bytes,
                                                  message: str) -> None:
    tsv = tmp_path / "participants.tsv"
    tsv.write_bytes(content)
    with pytest.raises(BadDataError, match=message) as error:
        read_participants(tsv)
    assert "\n" not in str(error.value)


def test_only_the_group_level_reads_the_table(pretrained_demo, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A 0-byte participants.tsv stops neither discovery nor the participant level."""
    bids = tmp_path / "bids"
    shutil.copytree(pretrained_demo.bids, bids)
    (bids / "participants.tsv").write_bytes(b"")
    out = tmp_path / "out"
    config = config_from_args(build_parser().parse_args([str(bids), str(out), "group"]))
    dataset = discover_runs(config)
    with pytest.raises(BadDataError, match="is empty"):
        dataset.participants   # noqa: B018 (read on first access)
    code = main([str(bids), str(out), "participant", "--model", str(pretrained_demo.model),
                 "--participant-label", "01", "--no-attribution", "--no-reports",
                 "--omp-nthreads", "1"])
    assert code == 0, capsys.readouterr().err[-3000:]


def test_runs_without_row_are_named(pretrained_demo, tmp_path: Path) -> None:
    config = config_from_args(build_parser().parse_args(
        [str(pretrained_demo.bids), str(tmp_path / "out"), "group"]))
    dataset = discover_runs(config)
    table = pd.DataFrame({"participant_id": ["sub-01", "sub-03"]})
    assert [name.split("_")[0] for name in runs_without_row(dataset.runs, table)] == \
        ["sub-02", "sub-04"]
