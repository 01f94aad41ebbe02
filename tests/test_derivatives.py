"""The derivatives writer: BIDS names, dataset_description.json, atomic and concurrent writes."""

from __future__ import annotations

import gzip
import json
import multiprocessing
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bidsapp._version import __version__
from bidsapp.bids.derivatives import (
    BIDS_VERSION,
    ENTITY_ORDER,
    LOCK_NAME,
    DerivativesWriter,
    build_filename,
    check_label,
    parse_filename,
)
from bidsapp.errors import CannotCreateOutputError, ExitCode, UsageError

RUN = {"sub": "01", "ses": "1", "task": "rest", "run": "1", "space": "MNI152NLin6Asym",
       "res": "2"}


@pytest.fixture(autouse=True)
def _no_container(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ROIMAE_CONTAINER_IMAGE", "APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
        monkeypatch.delenv(name, raising=False)


# --- file names -----------------------------------------------------------------------------


def test_entity_order_follows_the_specification() -> None:
    # The order of the BIDS "Entity table": sub first, space before atlas before res, desc last;
    # then stat (statistical derivatives, BEP041 draft) as nilearn writes it.
    assert ENTITY_ORDER[0] == "sub"
    assert ENTITY_ORDER[-2:] == ("desc", "stat")
    positions = [ENTITY_ORDER.index(key) for key in
                 ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "space", "atlas",
                  "seg", "res", "den", "label", "desc", "stat")]
    assert positions == sorted(positions)


def test_build_filename_orders_entities() -> None:
    name = build_filename({"stat": "mean", "desc": "roi", "res": "2", "atlas": "AAL3", "run": "1",
                           "space": "MNI152NLin2009cAsym", "task": "rest", "sub": "01"},
                          "timeseries", ".tsv")
    assert name == ("sub-01_task-rest_run-1_space-MNI152NLin2009cAsym_atlas-AAL3_res-2"
                    "_desc-roi_stat-mean_timeseries.tsv")


def test_parse_filename_of_fmriprep_output() -> None:
    entities, suffix, extension = parse_filename(
        "/data/sub-10/func/sub-10_task-balloonanalogrisktask_run-1_space-MNI152NLin2009cAsym"
        "_res-2_desc-preproc_bold.nii.gz"
    )
    assert entities == {"sub": "10", "task": "balloonanalogrisktask", "run": "1",
                        "space": "MNI152NLin2009cAsym", "res": "2", "desc": "preproc"}
    assert (suffix, extension) == ("bold", ".nii.gz")


_LABELS = st.text(alphabet="abcXYZ0129", min_size=1, max_size=6)
_VALUES = {key: (st.text(alphabet="0123456789", min_size=1, max_size=3)
                 if key in {"run", "echo", "flip", "inv", "split", "chunk"} else _LABELS)
           for key in ENTITY_ORDER}


@settings(max_examples=60, deadline=None)
@given(entities=st.dictionaries(st.sampled_from(ENTITY_ORDER), st.just(None), max_size=8)
       .flatmap(lambda keys: st.fixed_dictionaries({k: _VALUES[k] for k in keys})),
       suffix=st.sampled_from(["bold", "mask", "timeseries", "dseg"]),
       extension=st.sampled_from([".nii.gz", ".json", ".tsv"]))
def test_parse_filename_inverts_build_filename(entities: dict[str, str], suffix: str,
                                               extension: str) -> None:
    name = build_filename(entities, suffix, extension)
    parsed, parsed_suffix, parsed_extension = parse_filename(name)
    assert parsed == entities
    assert list(parsed) == [key for key in ENTITY_ORDER if key in entities]
    assert (parsed_suffix, parsed_extension) == (suffix, extension)


@pytest.mark.parametrize(("key", "value"), [("desc", "../x"), ("desc", "a_b"), ("desc", "a-b"),
                                            ("desc", ""), ("sub", "01/.."), ("run", "1a"),
                                            ("foo", "z"), ("stat", "t-1"),
                                            ("atlas", "AAL 3")])
def test_invalid_labels_are_usage_errors(key: str, value: str) -> None:
    with pytest.raises(UsageError) as info:
        check_label(key, value)
    assert info.value.exit_code == ExitCode.USAGE
    with pytest.raises(UsageError):
        build_filename({"sub": "01", key: value}, "bold", ".nii.gz")


def test_valid_labels_pass() -> None:
    assert check_label("atlas", "AAL3") == "AAL3"
    assert check_label("run", "01") == "01"


@pytest.mark.parametrize(("suffix", "extension"), [("bo_ld", ".nii"), ("bold", "nii"),
                                                   ("bold", ".nii/../x"), ("", ".tsv")])
def test_invalid_suffix_or_extension(suffix: str, extension: str) -> None:
    with pytest.raises(UsageError):
        build_filename({"sub": "01"}, suffix, extension)


@pytest.mark.parametrize("name", ["sub-01_task_bold.nii", "sub-01_sub-02_bold.nii",
                                  "sub-01_foo-1_bold.nii"])
def test_parse_filename_rejects_non_bids_names(name: str) -> None:
    with pytest.raises(UsageError):
        parse_filename(name)


# --- paths and URIs ---------------------------------------------------------------------------


def test_path_for_keeps_run_entities_and_adds_new_ones(tmp_path: Path) -> None:
    writer = DerivativesWriter(tmp_path)
    path = writer.path_for({**RUN, "desc": "preproc"}, suffix="timeseries", extension=".tsv",
                           atlas="AAL3", desc="embedding")
    assert path == (tmp_path / "sub-01" / "ses-1" / "func" /
                    "sub-01_ses-1_task-rest_run-1_space-MNI152NLin6Asym_atlas-AAL3_res-2"
                    "_desc-embedding_timeseries.tsv")
    no_session = writer.path_for({"sub": "02", "task": "rest", "desc": "preproc", "hemi": "L"},
                                 suffix="bold", extension=".nii.gz", datatype="anat")
    assert no_session == tmp_path / "sub-02" / "anat" / "sub-02_task-rest_bold.nii.gz"


def test_path_for_rejects_bad_input(tmp_path: Path) -> None:
    writer = DerivativesWriter(tmp_path)
    with pytest.raises(UsageError):
        writer.path_for({"task": "rest"}, suffix="bold", extension=".nii.gz")
    with pytest.raises(UsageError):
        writer.path_for(RUN, suffix="bold", extension=".nii.gz", desc="../../etc")
    with pytest.raises(UsageError):
        writer.path_for(RUN, suffix="bold", extension=".nii.gz", datatype="../x")


def test_bids_uri(tmp_path: Path) -> None:
    source = tmp_path / "fmriprep"
    writer = DerivativesWriter(tmp_path / "out", source_datasets={"preprocessed": source})
    assert writer.bids_uri(tmp_path / "out" / "sub-01" / "x.tsv") == "bids::sub-01/x.tsv"
    assert (writer.bids_uri(source / "sub-01" / "func" / "b.nii.gz")
            == "bids:preprocessed:sub-01/func/b.nii.gz")
    assert writer.bids_uri(tmp_path / "models" / "m.safetensors") == (
        f"file://{tmp_path}/models/m.safetensors")


def test_bids_uri_through_a_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    writer = DerivativesWriter(tmp_path / "out", source_datasets={"raw": tmp_path / "link"})
    assert writer.bids_uri(tmp_path / "real" / "sub-01" / "a.nii") == "bids:raw:sub-01/a.nii"


# --- dataset_description.json -----------------------------------------------------------------


def _description(out: Path) -> dict:
    return json.loads((out / "dataset_description.json").read_text())


def test_dataset_description(tmp_path: Path) -> None:
    source = tmp_path / "fmriprep"
    writer = DerivativesWriter(tmp_path / "out", source_datasets={"preprocessed": source},
                               pipeline_description="ROI-guided MAE")
    path = writer.ensure_dataset_description()
    assert path == tmp_path / "out" / "dataset_description.json"
    assert _description(tmp_path / "out") == {
        "Name": "roimae",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "roimae", "Version": __version__,
                         "CodeURL": "https://github.com/roimae/roimae",
                         "Description": "ROI-guided MAE"}],
        "SourceDatasets": [{"URL": f"file://{source}"}],
        "DatasetLinks": {"preprocessed": f"file://{source}"},
    }


@pytest.mark.parametrize(("env", "container"), [
    ({"ROIMAE_CONTAINER_IMAGE": "roimae/roimae:0.1.0"},
     {"Type": "docker", "Tag": "roimae/roimae:0.1.0"}),
    ({"ROIMAE_CONTAINER_IMAGE": "roimae/roimae:0.1.0", "APPTAINER_CONTAINER": "/img/r.sif"},
     {"Type": "apptainer", "Tag": "roimae/roimae:0.1.0"}),
    ({"SINGULARITY_CONTAINER": "/img/roimae_0.1.0.sif"},
     {"Type": "apptainer", "Tag": "roimae_0.1.0.sif"}),
])
def test_container_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               env: dict[str, str], container: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    DerivativesWriter(tmp_path).ensure_dataset_description()
    assert _description(tmp_path)["GeneratedBy"][0]["Container"] == container


def test_existing_description_is_kept_and_merged(tmp_path: Path) -> None:
    existing = {"Name": "my study", "BIDSVersion": "1.8.0", "DatasetType": "derivative",
                "License": "CC0",
                "GeneratedBy": [{"Name": "roimae", "Version": "0.0.1"}],
                "DatasetLinks": {"preprocessed": "file:///old"}}
    (tmp_path / "dataset_description.json").write_text(json.dumps(existing))
    writer = DerivativesWriter(tmp_path, source_datasets={"preprocessed": Path("/new"),
                                                          "raw": Path("/raw")})
    writer.ensure_dataset_description()
    merged = _description(tmp_path)
    assert {k: merged[k] for k in ("Name", "BIDSVersion", "License")} == {
        "Name": "my study", "BIDSVersion": "1.8.0", "License": "CC0"}
    assert [g["Version"] for g in merged["GeneratedBy"]] == ["0.0.1", __version__]
    # an existing link is never repointed; a new one is added
    assert merged["DatasetLinks"] == {"preprocessed": "file:///old", "raw": "file:///raw"}
    before = (tmp_path / "dataset_description.json").stat().st_mtime_ns
    writer.ensure_dataset_description()  # same version again: nothing to add, file untouched
    assert (tmp_path / "dataset_description.json").stat().st_mtime_ns == before
    assert len(_description(tmp_path)["GeneratedBy"]) == 2


@pytest.mark.parametrize("content", ['{"Name": "roimae", "BIDSV', "[1, 2]", ""])
def test_corrupt_description_is_rewritten(tmp_path: Path, content: str) -> None:
    (tmp_path / "dataset_description.json").write_text(content)
    DerivativesWriter(tmp_path).ensure_dataset_description()
    assert _description(tmp_path)["GeneratedBy"][0]["Name"] == "roimae"


def test_raw_dataset_as_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dataset_description.json").write_text('{"Name": "x", "DatasetType": "raw"}')
    with pytest.raises(CannotCreateOutputError) as info:
        DerivativesWriter(tmp_path).ensure_dataset_description()
    assert info.value.exit_code == ExitCode.CANNOT_CREATE_OUTPUT


def _ensure_description(out: Path, name: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    writer = DerivativesWriter(out, source_datasets={name: out.parent / name})
    barrier.wait()
    writer.ensure_dataset_description()


def test_concurrent_jobs_write_one_valid_description(tmp_path: Path) -> None:
    # Each job adds its own dataset link: without the lock, read-modify-write would lose some.
    out = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(8)
    jobs = [context.Process(target=_ensure_description, args=(out, f"job{i}", barrier))
            for i in range(8)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=60)
    assert [job.exitcode for job in jobs] == [0] * 8
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "dataset_description.json"]
    description = _description(out)
    assert sorted(description["DatasetLinks"]) == [f"job{i}" for i in range(8)]
    assert len(description["SourceDatasets"]) == 8
    assert len(description["GeneratedBy"]) == 1


# --- data files ---------------------------------------------------------------------------------


def test_write_tsv_uses_na_and_no_index(tmp_path: Path) -> None:
    writer = DerivativesWriter(tmp_path)
    table = pd.DataFrame({"region": ["PreCG_L", "PreCG_R"], "score": [0.5, np.nan]},
                         index=[10, 11])
    path = writer.write_tsv(tmp_path / "a.tsv", table)
    assert path.read_text() == "region\tscore\nPreCG_L\t0.5\nPreCG_R\tn/a\n"


def test_write_nifti_and_sidecar(tmp_path: Path) -> None:
    writer = DerivativesWriter(tmp_path)
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    path = writer.path_for(RUN, suffix="mask", extension=".nii.gz", desc="brain")
    writer.write_nifti(path, nib.Nifti1Image(data, affine))
    img = nib.load(path)
    np.testing.assert_array_equal(img.get_fdata(), data)
    np.testing.assert_array_equal(img.affine, affine)
    header = path.read_bytes()[:4]
    assert header[:2] == b"\x1f\x8b"  # gzip, as the name says
    assert not header[3] & 0x08  # no file name in the gzip header: the temp name must not leak
    gzip.decompress(path.read_bytes())
    sidecar = writer.write_sidecar(path, {"Type": "Brain", "Resolution": "2 mm"})
    assert sidecar == path.with_name(path.name.replace(".nii.gz", ".json"))
    assert json.loads(sidecar.read_text()) == {"Type": "Brain", "Resolution": "2 mm"}


def test_write_json_writes_null_for_nan(tmp_path: Path) -> None:
    # A bare NaN is not JSON (strict parsers and the BIDS validator refuse it).
    path = DerivativesWriter(tmp_path).write_json(tmp_path / "a.json", {"x": float("nan"),
                                                                         "y": [1.0, float("inf")]})
    assert json.loads(path.read_text()) == {"x": None, "y": [1.0, None]}
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


class _FailsWhenFormatted:
    """A table cell whose formatting raises, after the output file has been opened."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: list[str] = []

    def __str__(self) -> str:
        self.seen = sorted(p.name for p in self.folder.iterdir())
        raise RuntimeError("disk on fire")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "sub-01"
    out.mkdir()
    bomb = _FailsWhenFormatted(out)
    table = pd.DataFrame({"value": [*range(5000), bomb]}, dtype=object)
    with pytest.raises(RuntimeError, match="disk on fire"):
        DerivativesWriter(tmp_path).write_tsv(out / "sub-01_timeseries.tsv", table)
    # mid-way, the data went to a hidden temporary file beside the target ...
    assert len(bomb.seen) == 1 and bomb.seen[0].startswith(".sub-01_timeseries.")
    # ... which is gone: no target, no temporary file
    assert list(out.iterdir()) == []


def test_ensure_bidsignore_merges(tmp_path: Path) -> None:
    (tmp_path / ".bidsignore").write_text("logs/\n")
    writer = DerivativesWriter(tmp_path)
    writer.ensure_bidsignore(["*_timeseries.tsv", "logs/", "*_timeseries.tsv"])
    writer.ensure_bidsignore(["*.safetensors"])
    assert (tmp_path / ".bidsignore").read_text() == "logs/\n*_timeseries.tsv\n*.safetensors\n"
    with pytest.raises(UsageError):
        writer.ensure_bidsignore(["a\nb"])


def test_temporaries_left_by_killed_writers_are_removed(tmp_path: Path) -> None:
    from bidsapp.io import atomic_path, remove_stale_temporaries, remove_temporaries

    target = tmp_path / "sub-01_desc-roi_embedding.tsv"
    # What a writer killed inside ``atomic_path`` leaves: its temporary file, never the target.
    killed = atomic_path(target)
    partial = killed.__enter__()
    partial.write_text("half")
    assert partial.name.startswith(".sub-01_desc-roi_embedding.") and partial.suffix == ".tsv"
    other = tmp_path / ".sub-02_desc-roi_embedding.x1y2.tmp.tsv"
    other.write_text("half")
    kept = [tmp_path / "sub-02_desc-roi_embedding.tsv", tmp_path / ".bidsignore"]
    for path in kept:
        path.write_text("complete")
    # One output's temporaries (its sidecar shares the stem), then a whole directory's.
    assert remove_temporaries(tmp_path / "sub-01_desc-roi_embedding.json") == [partial]
    assert remove_stale_temporaries(tmp_path) == [other]
    assert sorted(tmp_path.iterdir()) == sorted(kept) and not target.exists()
    assert remove_stale_temporaries(tmp_path / "missing") == []
