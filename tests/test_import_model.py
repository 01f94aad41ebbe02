"""``roimae import-model`` and every level with an imported SwiFT or NeuroSTORM model, end to end.

The checkpoints are written as upstream's Lightning saves them (``tests/test_upstream.py``), with
random weights, at a small configuration that still reads roimae's 96^3 cube (embedding 8, one
block per stage, windows 4x4x4x2, 4 frames): a window takes about 0.1 s on one CPU thread, so
the demo runs through import, participant (with attribution), continued pretraining and group
in about a minute.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from test_upstream import Payload, hyper_parameters, randomize, save_lightning

from bidsapp.cli import main
from bidsapp.io import file_sha256

#: A small upstream configuration on roimae's cube (the released one: embed 36, depths 2 2 6 2,
#: windows 4x4x4x4, 20 frames).
SIZES = dict(img_size=(96, 96, 96, 4), embed_dim=8, window_size=(4, 4, 4, 2),
             first_window_size=(4, 4, 4, 2), patch_size=(6, 6, 6, 1), depths=(1, 1, 1, 1),
             num_heads=(1, 1, 1, 1), c_multiplier=2, last_layer_full_MSA=True)
THREADS = ["--omp-nthreads", "1", "--nprocs", "1"]
LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d \[(DEBUG|INFO|WARNING|ERROR)\] ")


def _network(family: str):
    from bidsapp.model.upstream import UpstreamConfig, build_upstream

    config = UpstreamConfig(family=family, mae=family == "neurostorm", **SIZES)
    return randomize(build_upstream(config), seed=3 if family == "neurostorm" else 4)


def run(argv: list, capsys) -> tuple[int, str]:
    """``roimae ARGV`` in-process: the exit code and stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:   # argparse
        code = exc.code
    return code, capsys.readouterr().err


def one_line(stderr: str) -> str:
    """The error line of a failed run (log records may precede it; no traceback)."""
    assert "Traceback" not in stderr
    others = [line for line in stderr.splitlines() if not LOG_RECORD.match(line)]
    assert len(others) == 1, others
    return others[0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Upstream-style Lightning checkpoints: NeuroSTORM's MAE, SwiFT's encoder with a task head."""
    root = tmp_path_factory.mktemp("ckpts")
    heads = {"weight": torch.zeros(2, 64), "bias": torch.zeros(2)}
    return {
        "neurostorm": save_lightning(root / "pt_neurostorm_small.ckpt", _network("neurostorm"),
                                     hyper_parameters("neurostorm", SIZES, pretraining=True,
                                                      use_mae=True)),
        "swift": save_lightning(root / "contrastive_pretrained.ckpt", _network("swift"),
                                hyper_parameters("swift", SIZES), heads),
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from bidsapp.demo import make_demo_dataset

    bids = tmp_path_factory.mktemp("import-demo") / "bids"
    make_demo_dataset(bids, n_participants=4, n_frames=8, seed=5)
    return bids


@pytest.fixture(scope="module")
def imported(tmp_path_factory, ckpts) -> Path:
    """OUTPUT_DIR with both checkpoints imported (desc-neurostorm, desc-swift)."""
    out = tmp_path_factory.mktemp("import-out") / "out"
    for family, ckpt in ckpts.items():
        assert main(["import-model", str(ckpt), str(out), "--from", family]) == 0
    return out


def test_import_writes_a_model_every_level_reads(imported, ckpts):
    from bidsapp import load_model
    from bidsapp.errors import UsageError
    from bidsapp.model.upstream import read_lightning_checkpoint

    for family, ckpt in ckpts.items():
        folder = imported / "models" / f"desc-{family}"
        assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.md",
                                                             "model.safetensors"]
        meta = json.loads((folder / "model.json").read_text())
        sha = file_sha256(ckpt)
        up = meta["upstream"]
        assert (meta["backbone"], meta["desc"], meta["preset"]["name"]) == (family, family, "released")
        assert up["source"] == ckpt.name and up["source_sha256"] == sha
        assert up["config"]["img_size"] == [96, 96, 96, 4] and meta["window_frames"] == 4
        assert meta["target_tr"] == (0.8 if family == "neurostorm" else None)
        assert "masking" not in meta
        card = (folder / "model.md").read_text()
        assert sha in card and up["repository"] in card and "data-use" in card.replace("data use", "data-use")
        assert "Apache-2.0" in card and ("MIT" in card) == (family == "neurostorm")
        assert ("output_head.weight" in card) == (family == "swift")   # the dropped task head
        assert "HCP, ABCD and UKB" in card if family == "swift" else "UK Biobank" in card

        model = load_model(folder)
        assert model.desc == family and model.masking is None and model.window_frames == 4
        assert model.preprocess_params().target_tr == meta["target_tr"]
        reference = read_lightning_checkpoint(ckpt).model
        x = torch.randn(1, 1, 96, 96, 96, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            stages = model.encode(x)
            expected = reference.encode(x)
            assert [s.shape for s in stages] == [e.shape for e in expected]
            assert all(torch.equal(s, e) for s, e in zip(stages, expected, strict=True))
            assert stages[-1].shape == (1, 64, 2, 2, 2, 4)
            if family == "neurostorm":
                assert torch.equal(model.decode(stages[-1]), reference.decode(expected[-1]))
                assert model.decode(stages[-1]).shape == (1, 1, 96, 96, 96, 4)
            else:
                with pytest.raises(UsageError, match="no decoder"):
                    model.decode(stages[-1])


@pytest.mark.parametrize(("case", "code", "expected"), [
    ("again", 64, "already holds a model; pass --overwrite"),
    ("desc roi", 64, "--desc 'roi' is reserved"),
    ("desc a-b", 64, "a BIDS label holds only letters and digits"),
    ("pickle", 65, "could run code"),
    ("unknown key", 65, "unknown key(s) in state_dict"),
    ("shape", 65, "has shape"),
    ("not the cube", 65, "needs img_size 96^3"),
    ("wrong family", 65, "asked for swift but"),
    ("missing", 66, "does not exist"),
])
def test_import_refusals_are_one_line_and_leave_no_folder(imported, ckpts, tmp_path, capsys, case,
                                                           code, expected):
    out, desc, family = tmp_path / "out", "bad", "neurostorm"
    ckpt = tmp_path / "bad.ckpt"
    state = {f"model.{k}": v for k, v in _network("neurostorm").state_dict().items()}
    hparams = hyper_parameters("neurostorm", SIZES)
    if case == "again":
        out, desc, ckpt = imported, "neurostorm", ckpts["neurostorm"]
    elif case.startswith("desc"):
        desc, ckpt = case.split()[1], ckpts["neurostorm"]
    elif case == "pickle":
        torch.save({"state_dict": state, "hyper_parameters": Payload(tmp_path / "pwned")}, ckpt)
    elif case == "unknown key":
        torch.save({"state_dict": {**state, "ema.weight": torch.zeros(1)}, "hyper_parameters": hparams},
                   ckpt)
    elif case == "shape":
        torch.save({"state_dict": state, "hyper_parameters": {**hparams, "embed_dim": 12}}, ckpt)
    elif case == "not the cube":
        small = dict(SIZES, img_size=(48, 48, 48, 4))
        from bidsapp.model.upstream import UpstreamConfig, build_upstream

        net = build_upstream(UpstreamConfig(family="swift", **small))
        save_lightning(ckpt, net, hyper_parameters("swift", small))
        family = "swift"
    elif case == "wrong family":
        ckpt, family = ckpts["neurostorm"], "swift"
    before = sorted(p.name for p in (out / "models").iterdir()) if (out / "models").is_dir() else []
    mtime = (imported / "models/desc-neurostorm/model.json").stat().st_mtime_ns
    got, err = run(["import-model", ckpt, out, "--from", family, "--desc", desc], capsys)
    assert got == code and expected in one_line(err)
    after = sorted(p.name for p in (out / "models").iterdir()) if (out / "models").is_dir() else []
    assert after == before   # no model folder, no temporary left
    assert (imported / "models/desc-neurostorm/model.json").stat().st_mtime_ns == mtime
    assert not (tmp_path / "pwned").exists()


def test_import_overwrite_replaces_the_folder(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["import-model", str(ckpts["swift"]), str(out), "--from", "swift", "--desc", "s1"]) == 0
    (out / "models/desc-s1/stray.txt").write_text("left by hand")
    assert main(["import-model", str(ckpts["swift"]), str(out), "--from", "swift", "--desc", "s1",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "models").iterdir()) == ["desc-s1"]
    assert not (out / "models/desc-s1/stray.txt").exists()


def _func(out: Path, subject: str = "01") -> Path:
    return out / f"sub-{subject}" / "func"


def test_participant_level_with_imported_models(imported, demo, tmp_path, capsys):
    """Embeddings, readouts and attribution; SwiFT (no decoder) says why reconerror is n/a."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(imported / "models", out / "models")
    for family in ("neurostorm", "swift"):
        code, err = run([demo, out, "participant", "--model-desc", family, "--participant-label",
                         "01", "--attribution-subsets", "2", *THREADS], capsys)
        assert code == 0, err
        stem = f"sub-01_task-rest_space-MNI152NLin6Asym_atlas-AAL3v1_res-2_desc-{family}"
        func = _func(out)
        windows = pd.read_csv(func / f"sub-01_task-rest_space-MNI152NLin6Asym_res-2_desc-{family}"
                                     "_embedding.tsv", sep="\t")
        assert len(windows) == (5 if family == "neurostorm" else 2)   # 20 frames at 0.8 s, or 8
        assert np.isfinite(windows.filter(like="e0").to_numpy()).all()
        assert windows.filter(like="e0").shape[1] == 64
        connectivity = pd.read_csv(func / f"{stem}_stat-pearsoncorrelation_relmat.tsv", sep="\t",
                                   index_col=0, na_values="n/a")
        assert connectivity.shape == (166, 166)
        table = pd.read_csv(func / f"{stem}_attribution.tsv", sep="\t", na_values="n/a")
        assert table["occlusion"].notna().sum() > 100
        assert np.isfinite(table["occlusion"].dropna()).all()
        described = json.loads((func / f"{stem}_attribution.json").read_text())
        done = json.loads((func / f"sub-01_task-rest_space-MNI152NLin6Asym_res-2_desc-{family}"
                                  "_embedding.json").read_text())
        assert done["Model"]["Upstream"]["Family"] == family
        report = (out / "sub-01.html").read_text()
        if family == "neurostorm":
            assert table["reconerror"].notna().sum() > 100
            assert done["Attribution"]["ReconstructionErrorMissing"] is None
        else:
            assert table["reconerror"].isna().all()
            why = done["Attribution"]["ReconstructionErrorMissing"]
            assert "no decoder" in why and why in described["reconerror"]["Description"]
            assert "No reconstruction error: the swift model" in report
            recon = nib.load(func / f"{stem}_stat-reconerror_boldmap.nii.gz").get_fdata()
            assert np.isnan(recon).any() and np.nanmax(np.abs(recon)) == 0   # NaN in every region


def test_continued_pretraining_and_group_comparison(imported, demo, tmp_path, capsys):
    """pretrain --init-from NeuroSTORM with roi masking, resume, then group beside the imports."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(imported / "models", out / "models")
    origin = out / "models" / "desc-neurostorm"
    fast = ["--participant-label", "01", "--val-fraction", "0", "--batch-size", "5", *THREADS]
    pretrain = [demo, out, "pretrain", "--init-from", origin, "--masking", "roi", "--epochs", "1", *fast]
    code, err = run(pretrain, capsys)
    assert code == 0, err
    folder = out / "models" / "desc-roi"
    meta = json.loads((folder / "model.json").read_text())
    source = json.loads((origin / "model.json").read_text())
    assert meta["backbone"] == "neurostorm" and meta["masking"]["masking"] == "roi"
    assert meta["init_from"]["weights_sha256"] == source["weights_sha256"]
    assert meta["upstream"] == source["upstream"] and meta["target_tr"] == 0.8
    assert meta["window_frames"] == 4 and np.isfinite(meta["metrics"]["train_loss"])
    card = (folder / "model.md").read_text()
    assert "## Initialised from" in card and source["upstream"]["source_sha256"] in card
    assert "Apache-2.0" in card and "MIT" in card
    # Resume: with the same origin it continues; without it (another network) it is refused.
    code, err = run([demo, out, "pretrain", "--init-from", origin, "--masking", "roi", "--epochs", "2",
                     "--resume", *fast], capsys)
    assert code == 0, err
    assert json.loads((folder / "model.json").read_text())["epoch"] == 2
    code, err = run([demo, out, "pretrain", "--masking", "roi", "--epochs", "3", "--resume",
                     "--window-frames", "2", *fast], capsys)
    assert code == 64 and "--resume: checkpoint epoch-002 was trained with another preset" in one_line(err)

    for desc in ("neurostorm", "swift", "roi"):
        code, err = run([demo, out, "participant", "--model-desc", desc, "--no-attribution",
                         "--no-reports", *THREADS], capsys)
        assert code == 0, err
    code, err = run([demo, out, "group", "--target", "diagnosis", "--cv-folds", "2", "--cv-repeats",
                     "1", "--n-permutations", "0", "--compare", "neurostorm", "swift", "roi", "fc",
                     *THREADS], capsys)
    assert code == 0, err
    comparison = pd.read_csv(out / "group" / "target-diagnosis_comparison.tsv", sep="\t")
    sets = set(comparison.iloc[:, :2].astype(str).to_numpy().ravel())
    assert {"neurostorm-connectivity", "swift-connectivity", "roi-connectivity", "fc"} <= sets


@pytest.mark.parametrize(("options", "expected"), [
    (["--backbone", "swift", "--preset", "released"], "SwiFT's encoder has no decoder"),
    (["--backbone", "swin4d", "--preset", "released"], "the swin4d backbone has the preset(s)"),
    (["--backbone", "neurostorm", "--window-frames", "10"], "reads 20-frame windows"),
    (["--init-from", "{swift}"], "cannot be pretrained"),
    (["--init-from", "{neurostorm}", "--preset", "base"], "is a model of --preset released"),
    (["--init-from", "{neurostorm}", "--window-frames", "10"], "is a model of --window-frames 4"),
    (["--init-from", "{missing}"], "does not exist"),
    (["--init-from", "{roi}", "--overwrite"], "the folder this run writes"),
])
def test_pretrain_refuses_what_cannot_be_pretrained(imported, demo, tmp_path, capsys, options,
                                                     expected):
    out = tmp_path / "out"
    paths = {"swift": imported / "models/desc-swift", "neurostorm": imported / "models/desc-neurostorm",
             "missing": tmp_path / "models/desc-none", "roi": out / "models/desc-roi"}
    if "{roi}" in options:   # a model in the very folder a roi pretraining writes
        import shutil

        shutil.copytree(paths["neurostorm"], paths["roi"])
    argv = [demo, out, "pretrain", *[o.format(**paths) for o in options], *THREADS]
    code, err = run(argv, capsys)
    assert code == (66 if "missing" in options[-1] else 64)
    assert expected in one_line(err)
    assert sorted(p.name for p in (out / "models").glob("*")) == (["desc-roi"] if "{roi}" in options else [])


def test_sidecar_schema_of_upstream_models(imported):
    from bidsapp.checkpoint import validate_metadata
    from bidsapp.errors import BadDataError

    meta = json.loads((imported / "models/desc-neurostorm/model.json").read_text())
    validate_metadata(json.dumps(meta), Path("model.json"))
    damage = {
        "no upstream": (lambda m: m.pop("upstream"), "needs its neurostorm network configuration"),
        "frames": (lambda m: m.update(window_frames=20), "is not the 4 frames"),
        "config": (lambda m: m["upstream"]["config"].update(depths=[1, 1]),
                   "upstream configuration"),
        "unknown config key": (lambda m: m["upstream"]["config"].update(wings=2), "unexpected keyword"),
        "not the cube": (lambda m: m["upstream"]["config"].update(img_size=[48, 48, 48, 4]),
                         "does not read roimae's 96^3 cube"),
        "swin4d": (lambda m: m.update(backbone="swin4d"), "swin4d has no preset 'released'"),
        "masking": (lambda m: m.pop("upstream") and m.update(backbone="swin4d", preset={"name": "tiny"},
                                                             window_frames=10),
                    "masking: Field required"),
        "desc": (lambda m: m.update(desc="../x"), "desc"),
    }
    for name, (edit, expected) in damage.items():
        damaged = json.loads(json.dumps(meta))
        edit(damaged)
        with pytest.raises(BadDataError, match=re.escape(expected)):
            validate_metadata(json.dumps(damaged), Path("model.json"))
        assert name
