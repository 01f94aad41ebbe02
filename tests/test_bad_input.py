"""Bad input, one table: every case exits with its README code, one error line, and no partial output.

Each case builds its input in ``tmp_path`` (a copy of a small demo dataset, of the 0-byte fMRIPrep
fixture, of the atlas or of a pretrained checkpoint, then damaged), runs ``roimae`` in-process
through :func:`bidsapp.cli.main` and checks

- the exit code of the README table and a fragment of the message;
- that the message is one ``roimae: error:`` line, the last on standard error, without traceback;
- that nothing but the run's log (``logs/``), its work directory (``.roimae-work/``) and, for a
  failure after the outputs were started, ``dataset_description.json`` / ``.bidsignore`` (and
  their lock file) appeared in OUTPUT_DIR, and that no temporary file (``*.tmp*``) is left.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch

from bidsapp.cli import main
from bidsapp.demo import make_demo_dataset

#: A console log record (``HH:MM:SS [LEVEL] message``), as bidsapp.logs formats them.
_LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d \[(DEBUG|INFO|WARNING|ERROR)\] ")
ENTITIES = "task-rest_space-MNI152NLin6Asym_res-2"
FAST = ["--window-frames", "10", "--epochs", "1", "--batch-size", "2"]
#: What a run may leave in OUTPUT_DIR when it fails before / after it started writing outputs.
EARLY_LEFTOVERS = {"logs", ".roimae-work"}
LATE_LEFTOVERS = EARLY_LEFTOVERS | {"dataset_description.json", ".bidsignore", ".roimae.lock"}


#: Leave no console handler on capsys's closed stream to the tests that follow.
pytestmark = pytest.mark.usefixtures("fresh_logging")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-participant, 10-frame demo dataset (read-only: cases damage copies of it)."""
    root = tmp_path_factory.mktemp("bad-input") / "demo"
    make_demo_dataset(root, n_participants=4, n_frames=10, seed=0)
    return root


@pytest.fixture(scope="module")
def pretrained(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUTPUT_DIR of one tiny pretraining (1 epoch, 10-frame windows) on the demo."""
    out = tmp_path_factory.mktemp("bad-input-model") / "out"
    assert main([str(demo), str(out), "pretrain", *FAST, "--nprocs", "1"]) == 0
    return out


@dataclass
class Ctx:
    """What a case builds on; ``checks`` are extra assertions run after the command."""

    tmp: Path
    request: pytest.FixtureRequest
    out: Path
    checks: list[Callable[[], None]] = field(default_factory=list)

    @property
    def demo(self) -> Path:
        return self.request.getfixturevalue("demo")

    @property
    def pretrained(self) -> Path:
        return self.request.getfixturevalue("pretrained")

    @property
    def model(self) -> Path:
        return self.pretrained / "models" / "desc-roi" / "model.safetensors"

    def demo_copy(self) -> Path:
        copy = self.tmp / "bids"
        shutil.copytree(self.demo, copy)
        return copy

    def model_copy(self) -> Path:
        folder = self.tmp / "ckpt"
        folder.mkdir()
        for name in ("model.safetensors", "model.json"):
            shutil.copy(self.model.with_name(name), folder / name)
        return folder / "model.safetensors"


def _bold(bids: Path, sub: str = "01") -> Path:
    return bids / f"sub-{sub}/func/sub-{sub}_{ENTITIES}_desc-preproc_bold.nii.gz"


def _mask(bids: Path, sub: str = "01") -> Path:
    return bids / f"sub-{sub}/func/sub-{sub}_{ENTITIES}_desc-brain_mask.nii.gz"


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Replace a NIfTI by ``data`` on ``affine`` (default: its own), keeping its TR."""
    old = nib.load(path)
    img = nib.Nifti1Image(data, old.affine if affine is None else affine)
    if data.ndim == 4:
        img.header.set_zooms((*img.header.get_zooms()[:3], old.header.get_zooms()[3]))
    img.header.set_xyzt_units("mm", "sec")
    path.unlink()
    nib.save(img, path)


def _bold_data(bids: Path) -> np.ndarray:
    return nib.load(_bold(bids)).get_fdata(dtype=np.float32)


def _participant(ctx: Ctx, bids: Path, *extra: str) -> list[str]:
    """The participant level with the shared model (a ``--model`` in ``extra`` replaces it)."""
    return [bids, ctx.out, "participant", "--model", ctx.model, "--no-reports", *extra]


def _pretrain(ctx: Ctx, bids: Path, *extra: str) -> list[str]:
    return [bids, ctx.out, "pretrain", *FAST, *extra]


# --- input datasets ------------------------------------------------------------------------------

def no_description(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    (bids / "dataset_description.json").unlink()
    return _pretrain(ctx, bids)


def not_bids(ctx: Ctx) -> list:
    folder = ctx.tmp / "home"
    (folder / "photos").mkdir(parents=True)
    (folder / "notes.txt").write_text("not a dataset\n")
    (folder / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    return _pretrain(ctx, folder)


def description_not_json(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    (bids / "dataset_description.json").write_text('{"Name": "demo", "DatasetType": ')
    return _pretrain(ctx, bids)


def bids_dir_is_a_file(ctx: Ctx) -> list:
    afile = ctx.tmp / "dataset.zip"
    afile.write_bytes(b"PK\x03\x04")
    return _pretrain(ctx, afile)


def _empty_fmriprep(ctx: Ctx) -> Path:
    """The ds000001 fMRIPrep fixture (0-byte NIfTIs): its description and sub-16's MNI BOLD + masks."""
    source = ctx.request.getfixturevalue("bids_examples") / "ds000001-fmriprep"
    copy = ctx.tmp / "ds000001-fmriprep"
    (copy / "sub-16" / "func").mkdir(parents=True)
    shutil.copy(source / "dataset_description.json", copy)
    pattern = "sub-16/func/*_space-MNI152NLin2009cAsym_res-2_desc-*"
    files = [p for p in source.glob(pattern) if "preproc_bold" in p.name or "brain_mask" in p.name]
    assert len(files) == 12 and all(p.stat().st_size == 0 for p in files if p.suffix == ".gz")
    for path in files:
        shutil.copy(path, copy / "sub-16" / "func")
    return copy


def zero_byte_pretrain(ctx: Ctx) -> list:
    return _pretrain(ctx, _empty_fmriprep(ctx))


def zero_byte_participant(ctx: Ctx) -> list:
    return _participant(ctx, _empty_fmriprep(ctx))


def truncated_gz(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    bold = _bold(bids)
    data = bold.read_bytes()
    bold.write_bytes(data[: len(data) * 2 // 3])
    return _participant(ctx, bids, "--participant-label", "01")


def bold_3d(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    _rewrite(_bold(bids), _bold_data(bids)[..., 0])
    return _pretrain(ctx, bids)


def too_few_frames_pretrain(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    _rewrite(_bold(bids), _bold_data(bids)[..., :5])
    return _pretrain(ctx, bids)


def too_few_frames_participant(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    _rewrite(_bold(bids), _bold_data(bids)[..., :9])  # the model's windows are 10 frames
    return _participant(ctx, bids, "--participant-label", "01")


def _non_finite(ctx: Ctx, value: float) -> Path:
    bids = ctx.demo_copy()
    data = _bold_data(bids)
    inside = np.argwhere(nib.load(_mask(bids)).get_fdata() > 0)[1000]
    data[(*inside, 3)] = value
    _rewrite(_bold(bids), data)
    return bids


def nan_voxel(ctx: Ctx) -> list:
    return _pretrain(ctx, _non_finite(ctx, np.nan))


def inf_voxel(ctx: Ctx) -> list:
    return _participant(ctx, _non_finite(ctx, np.inf), "--participant-label", "01")


def affine_not_mni(ctx: Ctx) -> list:
    """Scanner coordinates under an MNI file name: BOLD and mask 80 mm up and 40 mm forward."""
    bids = ctx.demo_copy()
    affine = nib.load(_bold(bids)).affine.copy()
    affine[:3, 3] += [0.0, 40.0, 80.0]
    _rewrite(_bold(bids), _bold_data(bids), affine)
    mask = nib.load(_mask(bids))
    _rewrite(_mask(bids), np.asarray(mask.dataobj), affine)
    return _pretrain(ctx, bids)


def mask_other_grid(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    mask = np.asarray(nib.load(_mask(bids)).dataobj)[::2, ::2, ::2]   # a 4 mm mask
    affine = nib.load(_mask(bids)).affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    _rewrite(_mask(bids), np.ascontiguousarray(mask), affine)
    return _participant(ctx, bids, "--participant-label", "01")


def _bold_sidecar(bids: Path, sub: str = "01") -> Path:
    return _bold(bids, sub).with_name(_bold(bids, sub).name.replace(".nii.gz", ".json"))


def _no_header_tr(bids: Path) -> None:
    img = nib.load(_bold(bids))
    data = np.asanyarray(img.dataobj)
    new = nib.Nifti1Image(data, img.affine, img.header)
    new.header.set_zooms((*img.header.get_zooms()[:3], 0.0))
    _bold(bids).unlink()
    nib.save(new, _bold(bids))


def tr_missing(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    sidecar = json.loads(_bold_sidecar(bids).read_text())
    del sidecar["RepetitionTime"]
    _bold_sidecar(bids).write_text(json.dumps(sidecar))
    _no_header_tr(bids)
    return _participant(ctx, bids, "--participant-label", "01")


def tr_infinite(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    text = _bold_sidecar(bids).read_text()
    _bold_sidecar(bids).write_text(text.replace('"RepetitionTime": 2.0', '"RepetitionTime": Infinity'))
    return _participant(ctx, bids, "--participant-label", "01")


def bold_sidecar_not_json(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    _bold_sidecar(bids, "03").write_text('{"RepetitionTime": 2.0,')
    return _participant(ctx, bids, "--participant-label", "01")


def bold_sidecar_array(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    _bold_sidecar(bids, "03").write_text("[2.0]")
    return _pretrain(ctx, bids)


def _gz_header_frames(path: Path, frames: int) -> None:
    """Rewrite a .nii.gz so that its header claims ``frames`` frames (the data stay as they are)."""
    import gzip

    raw = bytearray(gzip.decompress(path.read_bytes()))
    dim = np.frombuffer(raw[40:56], dtype="<i2").copy()
    dim[4] = frames
    raw[40:56] = dim.tobytes()
    path.write_bytes(gzip.compress(bytes(raw), compresslevel=1))


def header_claims_frames_gz(ctx: Ctx) -> list:
    """32,000 frames claimed, 10 held (test_inputs.py checks nothing near 26 GiB is allocated)."""
    bids = ctx.demo_copy()
    _gz_header_frames(_bold(bids), 32_000)
    return _participant(ctx, bids, "--participant-label", "01")


def header_claims_frames_nii(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    import gzip

    for path in (_bold(bids), _mask(bids)):
        unzipped = path.with_name(path.name.removesuffix(".gz"))
        unzipped.write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    nii = _bold(bids).with_name(_bold(bids).name.removesuffix(".gz"))
    raw = bytearray(nii.read_bytes())
    raw[48:50] = np.array([32_000], dtype="<i2").tobytes()
    nii.write_bytes(bytes(raw))
    return _pretrain(ctx, bids)


def complex_bold(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    data = _bold_data(bids)
    _rewrite(_bold(bids), (data + 1j * data).astype(np.complex64))
    return _participant(ctx, bids, "--participant-label", "01")


def non_ascii_subject(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    folder = bids / "sub-\u00fc5"
    shutil.copytree(bids / "sub-04", folder)
    for path in list((folder / "func").iterdir()):
        path.rename(path.with_name(path.name.replace("sub-04", "sub-\u00fc5")))
    return _participant(ctx, bids, "--participant-label", "01")


def _filter_file(ctx: Ctx, content: bytes) -> Path:
    path = ctx.tmp / "filters.json"
    path.write_bytes(content)
    return path


def filter_not_utf8(ctx: Ctx) -> list:
    path = _filter_file(ctx, '{"bold": {"task": "r\u00e9st"}}'.encode("latin-1"))
    return _participant(ctx, ctx.demo, "--bids-filter-file", path)


def filter_get_keyword(ctx: Ctx) -> list:
    path = _filter_file(ctx, b'{"bold": {"scope": "raw", "return_type": "id"}}')
    return _participant(ctx, ctx.demo, "--bids-filter-file", path)


def stale_database(ctx: Ctx) -> list:
    """A --bids-database-dir indexed before sub-04 was added."""
    from bidsapp.bids.layout import discover_runs
    from bidsapp.cli import build_parser, config_from_args

    bids = ctx.demo_copy()
    database = ctx.tmp / "pybids-db"
    shutil.move(bids / "sub-04", ctx.tmp / "later")
    discover_runs(config_from_args(build_parser().parse_args(
        [str(bids), str(ctx.tmp / "elsewhere"), "participant", "--bids-database-dir",
         str(database)])))
    shutil.move(ctx.tmp / "later", bids / "sub-04")
    return _participant(ctx, bids, "--participant-label", "04", "--bids-database-dir", database)


def bidsignore_not_utf8(ctx: Ctx) -> list:
    ctx.out.mkdir()
    (ctx.out / ".bidsignore").write_bytes("sub-*/caf\u00e9\n".encode("latin-1"))
    return _participant(ctx, ctx.demo, "--participant-label", "01")


def lock_is_a_symlink(ctx: Ctx) -> list:
    victim = ctx.tmp / "precious.txt"
    victim.write_text("keep me\n")
    ctx.out.mkdir()
    (ctx.out / ".roimae.lock").symlink_to(victim)

    def untouched() -> None:
        assert victim.read_text() == "keep me\n", "the lock truncated the link's target"
    ctx.checks.append(untouched)
    return _participant(ctx, ctx.demo, "--participant-label", "01")


# --- selection and paths ---------------------------------------------------------------------------

def unknown_label(ctx: Ctx) -> list:
    return _participant(ctx, ctx.demo, "--participant-label", "01", "sub-07")


def label_with_path(ctx: Ctx) -> list:
    return _participant(ctx, ctx.demo, "--participant-label", "../x")


def _input_untouched(ctx: Ctx, bids: Path) -> None:
    files = _files(bids)

    def untouched() -> None:
        assert _files(bids) == files, "the input dataset was written to"
    ctx.checks.append(untouched)


def output_is_bids_dir(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    ctx.out = bids
    _input_untouched(ctx, bids)
    return _participant(ctx, bids)


def output_inside_bids_dir(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    ctx.out = bids / "derivatives" / "roimae"
    _input_untouched(ctx, bids)
    return [bids, ctx.out, "group", "--target", "diagnosis"]


def work_dir_inside_bids_dir(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    _input_untouched(ctx, bids)
    return _participant(ctx, bids, "-w", bids / "work")


def _derivatives_root(ctx: Ctx) -> Path:
    """An fMRIPrep dataset given with ``-d`` (only its description: refused before it is read)."""
    root = ctx.tmp / "fmriprep"
    root.mkdir()
    shutil.copy(ctx.demo / "dataset_description.json", root)
    _input_untouched(ctx, root)
    return root


def work_dir_inside_derivatives(ctx: Ctx) -> list:
    root = _derivatives_root(ctx)
    return _participant(ctx, ctx.demo, "-d", f"fmriprep={root}", "-w", root / "work")


def output_inside_derivatives(ctx: Ctx) -> list:
    root = _derivatives_root(ctx)
    ctx.out = root / "roimae"
    return _participant(ctx, ctx.demo, "-d", f"fmriprep={root}")


def demo_into_a_non_empty_dir(ctx: Ctx) -> list:
    ctx.out.mkdir()
    (ctx.out / "thesis.tex").write_text("months of work\n")
    _input_untouched(ctx, ctx.out)
    return ["demo", ctx.out, "--participants", "4", "--frames", "2"]


def output_under_a_file(ctx: Ctx) -> list:
    afile = ctx.tmp / "afile"
    afile.write_text("a regular file\n")
    ctx.out = afile / "out"
    return _participant(ctx, ctx.demo)


# --- group level -----------------------------------------------------------------------------------

def _fake_embeddings(ctx: Ctx, bids: Path, models: dict[str, str] | None = None) -> None:
    """Run embeddings where the participant level writes them (the group level reads nothing else).

    ``models``: the model hash of some participants' runs (default: one model for all).
    """
    models = models or {}
    rng = np.random.default_rng(0)
    for sub in ("01", "02", "03", "04"):
        func = ctx.out / f"sub-{sub}/func"
        func.mkdir(parents=True)
        for name in ("stat-mean_embedding", "embedding"):
            pd.DataFrame(rng.normal(size=(1, 8)), columns=[f"e{i:03d}" for i in range(8)]).to_csv(
                func / f"sub-{sub}_{ENTITIES}_desc-roi_{name}.tsv", sep="\t", index=False)
        # The completion sidecar, written last by the participant level.
        (func / f"sub-{sub}_{ENTITIES}_desc-roi_embedding.json").write_text(json.dumps(
            {"Model": {"SHA256": models.get(sub, "0" * 64)}, "Attribution": None}))


def group_without_target(ctx: Ctx) -> list:
    return [ctx.demo, ctx.out, "group"]


def group_no_target_column(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    table = pd.read_csv(bids / "participants.tsv", sep="\t")
    table.drop(columns="diagnosis").to_csv(bids / "participants.tsv", sep="\t", index=False)
    _fake_embeddings(ctx, bids)
    return [bids, ctx.out, "group", "--target", "diagnosis", "--cv-folds", "2",
            "--features", "global"]


def group_one_class(ctx: Ctx) -> list:
    bids = ctx.demo_copy()
    table = pd.read_csv(bids / "participants.tsv", sep="\t")
    table.assign(diagnosis="control").to_csv(bids / "participants.tsv", sep="\t", index=False)
    _fake_embeddings(ctx, bids)
    return [bids, ctx.out, "group", "--target", "diagnosis", "--cv-folds", "2",
            "--features", "global"]


def _participants_tsv(ctx: Ctx, content: bytes) -> list:
    bids = ctx.demo_copy()
    (bids / "participants.tsv").write_bytes(content)
    _fake_embeddings(ctx, bids)
    return [bids, ctx.out, "group", "--target", "diagnosis", "--cv-folds", "2",
            "--features", "global"]


def participants_header_only(ctx: Ctx) -> list:
    return _participants_tsv(ctx, b"participant_id\tdiagnosis\n")


def participants_empty(ctx: Ctx) -> list:
    return _participants_tsv(ctx, b"")


def participants_duplicates(ctx: Ctx) -> list:
    rows = ["sub-01\tadhd", "sub-02\tcontrol", " sub-01\tcontrol", "03\tadhd", "sub-03\tadhd",
            "sub-04\tcontrol"]
    return _participants_tsv(ctx, ("participant_id\tdiagnosis\n" + "\n".join(rows) + "\n")
                             .encode())


def participants_latin1(ctx: Ctx) -> list:
    table = "participant_id\tdiagnosis\tsite\nsub-01\tadhd\tZ\u00fcrich\n"
    return _participants_tsv(ctx, table.encode("latin-1"))


def _group_with(ctx: Ctx, column: str, values: list, *extra: str) -> list:
    """The group level with a participants.tsv column added (fake embeddings of one model)."""
    bids = ctx.demo_copy()
    table = pd.read_csv(bids / "participants.tsv", sep="\t")
    table[column] = values
    table.to_csv(bids / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    _fake_embeddings(ctx, bids)
    return [bids, ctx.out, "group", "--target", "diagnosis", "--cv-folds", "2",
            "--features", "global", *extra]


def covariate_all_na(ctx: Ctx) -> list:
    return _group_with(ctx, "site", [None] * 4, "--covariates", "site")


def covariate_is_target(ctx: Ctx) -> list:
    return _group_with(ctx, "site", ["a"] * 4, "--covariates", "diagnosis")


def covariate_of_target(ctx: Ctx) -> list:
    table = pd.read_csv(ctx.demo / "participants.tsv", sep="\t")
    arm = table["diagnosis"].map({"adhd": "drug", "control": "placebo"}).tolist()
    return _group_with(ctx, "arm", arm, "--covariates", "arm")


def covariate_participant_id(ctx: Ctx) -> list:
    return _group_with(ctx, "site", ["a"] * 4, "--covariates", "participant_id")


def target_map_unmatched(ctx: Ctx) -> list:
    return _group_with(ctx, "site", ["a"] * 4, "--target-map", "ADHD=adhd")


def group_mixed_models(ctx: Ctx) -> list:
    """desc-roi embeddings of two pretrainings (e.g. one job rerun after pretrain --overwrite)."""
    _fake_embeddings(ctx, ctx.demo, models={"03": "b" * 64, "04": "b" * 64})
    return [ctx.demo, ctx.out, "group", "--target", "diagnosis", "--cv-folds", "2",
            "--features", "global"]


# --- atlas and checkpoints -------------------------------------------------------------------------

def atlas_labels_missing(ctx: Ctx) -> list:
    source = ctx.request.getfixturevalue("atlas_dir")
    folder = ctx.tmp / "atlas"
    folder.mkdir()
    shutil.copy(source / "AAL3v1_2mm.nii.gz", folder)
    table = pd.read_csv(source / "AAL3v1_labels.tsv", sep="\t", dtype=str, keep_default_na=False)
    table[~table["name"].str.startswith("Hippocampus")].to_csv(folder / "labels.tsv", sep="\t",
                                                               index=False)
    return _pretrain(ctx, ctx.demo, "--atlas", folder / "AAL3v1_2mm.nii.gz",
                     "--atlas-labels", folder / "labels.tsv")


def _sidecar(weights: Path, **changes) -> None:
    """Edit a checkpoint's JSON sidecar; its weight hash always matches the weight file."""
    sidecar = weights.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta.update(changes, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    sidecar.write_text(json.dumps(meta))


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_pickle(ctx: Ctx, path: Path) -> None:
    marker = ctx.tmp / "pwned"
    torch.save({"patch_embed.weight": _Payload(marker)}, path)

    def nothing_unpickled() -> None:
        assert not marker.exists(), "the pickle was loaded: it ran code"
    ctx.checks.append(nothing_unpickled)


def checkpoint_pickle(ctx: Ctx) -> list:
    """A pickle under the checkpoint's name, with a sidecar that vouches for it (hash included)."""
    weights = ctx.model_copy()
    _evil_pickle(ctx, weights)
    _sidecar(weights)
    return _participant(ctx, ctx.demo, "--participant-label", "01", "--model", weights)


def checkpoint_pickle_pt(ctx: Ctx) -> list:
    weights = ctx.tmp / "model.pt"
    _evil_pickle(ctx, weights)
    return _participant(ctx, ctx.demo, "--participant-label", "01", "--model", weights)


def checkpoint_truncated(ctx: Ctx) -> list:
    weights = ctx.model_copy()
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _sidecar(weights)
    return _participant(ctx, ctx.demo, "--participant-label", "01", "--model", weights)


def checkpoint_other_preset_option(ctx: Ctx) -> list:
    return _participant(ctx, ctx.demo, "--participant-label", "01", "--preset", "small")


def checkpoint_other_preset_weights(ctx: Ctx) -> list:
    """tiny weights whose sidecar says small: refused when the weights are loaded, not run."""
    weights = ctx.model_copy()
    meta = json.loads(weights.with_suffix(".json").read_text())
    _sidecar(weights, preset=dict(meta["preset"], name="small"))
    return _participant(ctx, ctx.demo, "--participant-label", "01", "--model", weights)


def _model_untouched(ctx: Ctx) -> None:
    """The models already in OUTPUT_DIR keep their bytes."""
    models = ctx.out / "models"
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in models.rglob("*.*")}

    def untouched() -> None:
        assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in models.rglob("*.*")} \
            == digests, "the model in OUTPUT_DIR was changed"
    ctx.checks.append(untouched)


def _with_model(ctx: Ctx) -> None:
    shutil.copytree(ctx.pretrained / "models", ctx.out / "models")
    _model_untouched(ctx)


def pretrain_over_a_model(ctx: Ctx) -> list:
    _with_model(ctx)
    return _pretrain(ctx, ctx.demo)


def resume_and_overwrite(ctx: Ctx) -> list:
    _with_model(ctx)
    return _pretrain(ctx, ctx.demo, "--resume", "--overwrite")


def resume_other_seed(ctx: Ctx) -> list:
    _with_model(ctx)
    return [ctx.demo, ctx.out, "pretrain", "--window-frames", "10", "--epochs", "2", "--resume",
            "--random-seed", "7"]


def resume_other_split(ctx: Ctx) -> list:
    _with_model(ctx)
    return [ctx.demo, ctx.out, "pretrain", "--window-frames", "10", "--epochs", "2", "--resume",
            "--val-fraction", "0.5"]


def resume_other_inputs(ctx: Ctx) -> list:
    """The same participants, but one BOLD file changed since the checkpoint was written."""
    bids = ctx.demo_copy()
    _rewrite(_bold(bids), _bold_data(bids) * 1.01)
    _with_model(ctx)
    return [bids, ctx.out, "pretrain", "--window-frames", "10", "--epochs", "2", "--resume"]


def diverged_training(ctx: Ctx) -> list:
    return _pretrain(ctx, ctx.demo, "--lr", "1e6")


def diverged_after_a_good_epoch(ctx: Ctx) -> list:
    """A 1-epoch model resumed for a second epoch at a rate that diverges: epoch 1 is kept."""
    _with_model(ctx)
    return _pretrain(ctx, ctx.demo, "--epochs", "2", "--resume", "--lr", "1e6")


def checkpoint_non_finite(ctx: Ctx) -> list:
    """The weights of a diverged pretraining (NaN), with a sidecar that vouches for them."""
    weights = ctx.model_copy()
    state = safetensors.torch.load_file(weights)
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    safetensors.torch.save_file(state, weights)
    _sidecar(weights)
    return _participant(ctx, ctx.demo, "--participant-label", "01", "--model", weights)


def checkpoint_overflowing(ctx: Ctx) -> list:
    """Finite weights (x 1e30, as a run going astray leaves them) whose embeddings overflow."""
    weights = ctx.model_copy()
    state = safetensors.torch.load_file(weights)
    safetensors.torch.save_file({k: v * 1e30 if v.is_floating_point() else v
                                 for k, v in state.items()}, weights)
    _sidecar(weights)
    return _participant(ctx, ctx.demo, "--participant-label", "01", "--model", weights)


def resume_other_preset(ctx: Ctx) -> list:
    shutil.copytree(ctx.pretrained / "models", ctx.out / "models")
    return [ctx.demo, ctx.out, "pretrain", "--window-frames", "10", "--epochs", "2",
            "--resume", "--preset", "small"]


def _damaged_sidecar(ctx: Ctx, edit: Callable[[dict], object]) -> list:
    """The participant level with a copy of the model whose sidecar ``edit`` changed."""
    weights = ctx.model_copy()
    sidecar = weights.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    text = edit(meta)
    sidecar.write_text(text if isinstance(text, str) else json.dumps(meta))
    return _participant(ctx, ctx.demo, "--participant-label", "01", "--model", weights)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


SIDECAR_DAMAGE: dict[str, tuple[Callable[[dict], object], str]] = {
    "preset a string": (lambda m: m.update(preset="tiny"), "preset: Input should be"),
    "backbone a list": (lambda m: m.update(backbone=["swin4d"]), "backbone: Input should be"),
    "masking missing": (lambda m: m.pop("masking"), "masking: Field required"),
    "window_frames missing": (lambda m: m.pop("window_frames"), "window_frames: Field required"),
    "window_frames 0": (lambda m: m.update(window_frames=0), "window_frames: Input should be"),
    "window_frames -5": (lambda m: m.update(window_frames=-5), "window_frames: Input should be"),
    "window_frames 'abc'": (lambda m: m.update(window_frames="abc"),
                            "window_frames: Input should be a valid integer"),
    "window_frames '10'": (lambda m: m.update(window_frames="10"),
                           "window_frames: Input should be a valid integer"),
    "deep nesting": (lambda m: json.dumps(m)[:-1] + ', "extra": ' + _nested(100_000) + "}",
                     "is not valid JSON: recursion limit exceeded"),
    "epoch NaN": (lambda m: json.dumps(dict(m, epoch=float("nan"))),
                  "epoch: Input should be a valid integer"),
    "weights a path": (lambda m: m.update(weights="../model.safetensors"),
                       "weights: '../model.safetensors' is not a bare file name"),
}


def _sidecar_case(name: str) -> Callable[[Ctx], list]:
    return lambda ctx: _damaged_sidecar(ctx, SIDECAR_DAMAGE[name][0])


def sidecar_utf16(ctx: Ctx) -> list:
    weights = ctx.model_copy()
    sidecar = weights.with_suffix(".json")
    sidecar.write_bytes(sidecar.read_text().encode("utf-16"))
    return _participant(ctx, ctx.demo, "--participant-label", "01", "--model", weights)


def sidecar_window_not_tubelet(ctx: Ctx) -> list:
    """A vit4d sidecar (5-frame tubelets) claiming 12-frame windows."""
    return _damaged_sidecar(ctx, lambda m: m.update(backbone="vit4d", window_frames=12))


def participant_other_window(ctx: Ctx) -> list:
    return _participant(ctx, ctx.demo, "--participant-label", "01", "--window-frames", "20")


def _resume(ctx: Ctx, damage: Callable[[Path], None]) -> list:
    shutil.copytree(ctx.pretrained / "models", ctx.out / "models")
    damage(ctx.out / "models" / "desc-roi")
    return [ctx.demo, ctx.out, "pretrain", *FAST[:2], "--epochs", "2", "--batch-size", "2",
            "--resume"]


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def resume_empty_log(ctx: Ctx) -> list:
    return _resume(ctx, lambda d: (d / "training_log.tsv").write_bytes(b""))


def resume_log_without_columns(ctx: Ctx) -> list:
    return _resume(ctx, lambda d: (d / "training_log.tsv").write_text("a\tb\n1\t2\n"))


def resume_optimizer_missing(ctx: Ctx) -> list:
    return _resume(ctx, lambda d: (d / "epoch-001_optim.safetensors").unlink())


def resume_optimizer_outside(ctx: Ctx) -> list:
    def damage(folder: Path) -> None:
        meta = json.loads((folder / "epoch-001.json").read_text())
        _edit_json(folder / "epoch-001.json",
                   optimizer=dict(meta["optimizer"], file="../../../../etc/passwd"))
    return _resume(ctx, damage)


@dataclass(frozen=True)
class Case:
    build: Callable[[Ctx], list]
    code: int
    message: str | tuple[str, ...]   # fragment(s) of the error line
    late: bool = False   # fails after dataset_description.json / .bidsignore were written


CASES = {
    # 16: not a BIDS dataset
    "no dataset_description.json": Case(no_description, 16, "no dataset_description.json"),
    "not a BIDS directory": Case(not_bids, 16, "is not a BIDS dataset"),
    "dataset_description.json not JSON": Case(description_not_json, 16, "is not valid JSON"),
    # 66: no input
    "BIDS_DIR is a file": Case(bids_dir_is_a_file, 66, "does not exist or is not a directory"),
    # 65: bad data
    "0-byte NIfTI, pretrain": Case(zero_byte_pretrain, 65, "Empty file"),
    "0-byte NIfTI, participant": Case(zero_byte_participant, 65, "Empty file", late=True),
    "truncated .nii.gz": Case(truncated_gz, 65, "(truncated or corrupt file?)", late=True),
    "3D BOLD": Case(bold_3d, 65, "expected a 4D BOLD series, got shape (91, 109, 91)"),
    "fewer frames than a window, pretrain": Case(too_few_frames_pretrain, 65,
                                                 "5 frames, fewer than one window of 10"),
    "fewer frames than a window, participant": Case(too_few_frames_participant, 65,
                                                    "9 frames, fewer than one window of 10",
                                                    late=True),
    "NaN voxel": Case(nan_voxel, 65, "1 voxels inside the brain mask hold NaN or infinite"),
    "Inf voxel": Case(inf_voxel, 65, "1 voxels inside the brain mask hold NaN or infinite",
                      late=True),
    "affine not in MNI space": Case(affine_not_mni, 65, "is not in MNI space"),
    "mask on another grid": Case(mask_other_grid, 65, "is not on the grid of", late=True),
    "atlas labels missing from its table": Case(atlas_labels_missing, 65,
                                                "2 image label(s) missing from the label table: [41, 42]"),
    "no repetition time anywhere": Case(tr_missing, 65, "the repetition time is unknown",
                                        late=True),
    "RepetitionTime Infinity": Case(tr_infinite, 65, "RepetitionTime inf in its sidecar is not "
                                    "a positive, finite number"),
    "BOLD sidecar not JSON": Case(bold_sidecar_not_json, 65, "is not a valid JSON sidecar: "
                                  "Expecting property name"),
    "BOLD sidecar an array": Case(bold_sidecar_array, 65, "is not a valid JSON sidecar: a list"),
    "header claims more frames than a .nii.gz holds": Case(header_claims_frames_gz, 65,
                                                          "(truncated or corrupt file?)",
                                                          late=True),
    "header claims more frames than a .nii holds": Case(header_claims_frames_nii, 65,
                                                       "its header claims 32000 frames"),
    "complex-valued BOLD": Case(complex_bold, 65, "complex-valued BOLD (complex64)", late=True),
    "non-ASCII sub- folder": Case(non_ascii_subject, 65, "invalid BIDS label sub-'\u00fc5'"),
    # 18: nothing selected
    "unknown participant label": Case(unknown_label, 18, "participant label(s) 07 not found"),
    "participant added after --bids-database-dir was built": Case(
        stale_database, 18, ("participant label(s) 04 not found", "may predate them")),
    # 64: usage
    "label with path characters": Case(label_with_path, 64, "invalid participant label '../x'"),
    "OUTPUT_DIR is BIDS_DIR": Case(output_is_bids_dir, 64, "is BIDS_DIR or inside it"),
    "OUTPUT_DIR inside BIDS_DIR": Case(output_inside_bids_dir, 64, "is BIDS_DIR or inside it"),
    "-w inside BIDS_DIR": Case(work_dir_inside_bids_dir, 64,
                               "the work directory (-w) {tmp}/bids/work is BIDS_DIR or inside it"),
    "-w inside a -d root": Case(work_dir_inside_derivatives, 64,
                                "the work directory (-w) {tmp}/fmriprep/work is -d fmriprep or "
                                "inside it"),
    "OUTPUT_DIR inside a -d root": Case(output_inside_derivatives, 64,
                                        "OUTPUT_DIR {tmp}/fmriprep/roimae is -d fmriprep or "
                                        "inside it"),
    "demo into a non-empty directory": Case(demo_into_a_non_empty_dir, 64,
                                            ("{tmp}/out is not empty", "--overwrite")),
    "pretrain over a model": Case(pretrain_over_a_model, 64,
                                  ("desc-roi already holds a pretrained model (model.json, "
                                   "epoch-001.json)", "--resume", "--overwrite")),
    "--resume with --overwrite": Case(resume_and_overwrite, 64, "give one of them"),
    "--resume with another seed": Case(resume_other_seed, 64,
                                       "was trained with another --random-seed (0)"),
    "--resume with another split": Case(resume_other_split, 64, "was trained with another split "
                                        "of participants into training and held-out sets"),
    "--resume on other inputs": Case(resume_other_inputs, 64, "was trained with another set of "
                                     "input runs"),
    "group without --target": Case(group_without_target, 64, "needs --target COLUMN"),
    "filter file not UTF-8": Case(filter_not_utf8, 64, "is not valid UTF-8 JSON"),
    "filter file with get() options": Case(filter_get_keyword, 64,
                                           "'return_type', 'scope' is an option of pybids' get()"),
    "--target-tr 1e-6": Case(lambda ctx: _pretrain(ctx, ctx.demo, "--target-tr", "1e-6"), 64,
                             "preprocess.target_tr: Input should be greater than or equal to 0.05"),
    "--warmup-epochs inf": Case(lambda ctx: _pretrain(ctx, ctx.demo, "--warmup-epochs", "inf"), 64,
                                "pretrain.warmup_epochs: Input should be a finite number"),
    "--attribution-subsets odd": Case(
        lambda ctx: _participant(ctx, ctx.demo, "--attribution-subsets", "3"), 64,
        "participant.attribution_subsets: 3 is odd"),
    "--omp-nthreads 0": Case(lambda ctx: _pretrain(ctx, ctx.demo, "--omp-nthreads", "0"), 64,
                             "omp_nthreads: Input should be greater than or equal to 1"),
    # 73: cannot create output
    "OUTPUT_DIR under a regular file": Case(output_under_a_file, 73, "cannot create directory"),
    ".bidsignore not UTF-8": Case(bidsignore_not_utf8, 73, ".bidsignore is not UTF-8 text",
                                  late=True),
    "lock file a symbolic link": Case(lock_is_a_symlink, 73, ".roimae.lock is a symbolic link"),
    # 65: group-level input; refused before the output's provenance names this run
    "participants.tsv without the target": Case(group_no_target_column, 65,
                                                 "participants.tsv has no column 'diagnosis'"),
    "participants.tsv with one class": Case(group_one_class, 65,
                                            "the target has a single class ('control')"),
    "participants.tsv with a header only": Case(participants_header_only, 65,
                                                "none of the 4 selected runs has a row in"),
    "participants.tsv of 0 bytes": Case(participants_empty, 65,
                                        "is empty: it needs at least a participant_id header"),
    "participants.tsv with duplicate ids": Case(participants_duplicates, 65,
                                                "lists participant(s) sub-01, sub-03 on more than "
                                                "one row"),
    "participants.tsv in Latin-1": Case(participants_latin1, 65,
                                        "is not UTF-8 text (byte 0xfc on line 2)"),
    "group: embeddings of two models under one desc": Case(
        group_mixed_models, 65, ("the desc-roi embeddings come from 2 different models",
                                 "model 000000000000: 2 runs (sub-01", "model bbbbbbbbbbbb: 2 runs")),
    "covariate column without a value": Case(covariate_all_na, 65,
                                             "column 'site' has no value for any scored participant"),
    # 64: group-level usage
    "covariate is the target": Case(covariate_is_target, 64, "--covariates diagnosis is the --target"),
    "covariate is a function of the target": Case(covariate_of_target, 64,
                                                  "--covariates arm is a function of the target"),
    "covariate participant_id": Case(covariate_participant_id, 64,
                                     "--covariates participant_id: the id names each participant"),
    "--target-map key matches no value": Case(target_map_unmatched, 64,
                                              "--target-map 'ADHD': no participant has"),
    # checkpoints: never unpickled; refused unless they fit
    "checkpoint is a pickle": Case(checkpoint_pickle, 65, "is not a valid safetensors file"),
    "checkpoint is a .pt pickle": Case(checkpoint_pickle_pt, 64,
                                       "pickled PyTorch checkpoints are refused"),
    "truncated safetensors": Case(checkpoint_truncated, 65, "is not a valid safetensors file"),
    "checkpoint of another preset (--preset)": Case(checkpoint_other_preset_option, 64,
                                                    "is a 'tiny' model but --preset small"),
    "checkpoint of another preset (weights)": Case(checkpoint_other_preset_weights, 65,
                                                   ("does not fit the", "'small' model")),
    "--resume from another preset": Case(resume_other_preset, 64,
                                         "was trained with another preset"),
    **{f"checkpoint sidecar: {name}": Case(_sidecar_case(name), 65, message)
       for name, (_, message) in SIDECAR_DAMAGE.items()},
    "checkpoint sidecar: UTF-16": Case(sidecar_utf16, 65, "is not valid JSON"),
    "checkpoint sidecar: window not a multiple of the tubelet": Case(
        sidecar_window_not_tubelet, 65, "window_frames 12 is not a multiple of the vit4d tubelet"),
    "--window-frames other than the model's": Case(participant_other_window, 64,
                                                   "was trained on 10-frame windows"),
    "--resume with an empty training log": Case(resume_empty_log, 65,
                                                 "the training log", ),
    "--resume with a training log of other columns": Case(resume_log_without_columns, 65,
                                                          "columns epoch, train_loss"),
    "--resume without the optimizer file": Case(resume_optimizer_missing, 65,
                                                ("epoch-001_optim.safetensors", "is missing")),
    "--resume with an optimizer file outside the model folder": Case(
        resume_optimizer_outside, 65, "optimizer.file: '../../../../etc/passwd' is "
        "not a bare file name"),
    # 65: non-finite numbers from training
    "diverged training (--lr 1e6)": Case(diverged_training, 65,
                                         ("training diverged at epoch 1, step",
                                          "lower --lr (now 1e+06)", "no model was written"),
                                         late=True),
    "diverged after a good epoch (--resume --lr 1e6)": Case(
        diverged_after_a_good_epoch, 65,
        ("training diverged at epoch 2, step", "epoch-001, is kept and no new model written"),
        late=True),
    "checkpoint with non-finite weights": Case(checkpoint_non_finite, 65,
                                               "holds non-finite weights"),
    "checkpoint with overflowing embeddings": Case(checkpoint_overflowing, 65,
                                                   "gives non-finite embeddings for sub-01",
                                                   late=True),
}


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")} if root.is_dir() else set()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, request: pytest.FixtureRequest,
                   capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    ctx = Ctx(tmp=tmp_path, request=request, out=tmp_path / "out")
    argv = [str(a) for a in case.build(ctx)]
    before = _files(ctx.out)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:   # argparse errors leave main() as the console script does
        code = exc.code
    err = capsys.readouterr().err

    assert code == case.code, err[-3000:]
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("roimae: error: "), err[-3000:]
    others = [line for line in lines if not _LOG_RECORD.match(line)]
    assert others == [lines[-1]], others
    fragments = (case.message,) if isinstance(case.message, str) else case.message
    fragments = tuple(fragment.replace("{tmp}", str(tmp_path)) for fragment in fragments)
    assert all(fragment in lines[-1] for fragment in fragments), lines[-1]
    # No partial output: only the log, the work directory and (late failures) the dataset files.
    allowed = LATE_LEFTOVERS if case.late else EARLY_LEFTOVERS
    new = sorted(str(p) for p in _files(ctx.out) - before if p.parts[0] not in allowed)
    assert new == []
    assert sorted(str(p) for p in tmp_path.rglob("*.tmp*")) == []
    for check in ctx.checks:
        check()
