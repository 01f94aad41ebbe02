"""Every output knows its model: no mixed, stale or silently replaced model outputs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
from conftest import PretrainedDemo

from bidsapp.api import RoimaeEmbedder
from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.cli import main
from bidsapp.errors import UsageError
from bidsapp.io import file_sha256
from bidsapp.outputs import RunOutputs

PREFIX = "task-rest_space-MNI152NLin6Asym_res-2"
COMMON = ["--no-reports", "--nprocs", "1", "--omp-nthreads", "1", "--no-attribution"]

#: Leave no console handler on capsys's closed stream to the tests that follow.
pytestmark = pytest.mark.usefixtures("fresh_logging")


def _other_model(source: Path, folder: Path) -> Path:
    """A copy of a model folder whose weights differ (and whose sidecar names their hash)."""
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + 0.01
    safetensors.torch.save_file(tensors, weights)
    sidecar = json.loads((folder / "model.json").read_text())
    sidecar["weights_sha256"] = file_sha256(weights)
    (folder / "model.json").write_text(json.dumps(sidecar))
    return weights


def _participant(demo: PretrainedDemo, out: Path, *extra: str) -> int:
    return main([str(demo.bids), str(out), "participant", "--participant-label", "01", "02",
                 "-w", str(out.parent / "work"), *COMMON, *extra])


def _done(out: Path, sub: str) -> Path:
    return out / f"sub-{sub}/func/sub-{sub}_{PREFIX}_desc-roi_embedding.json"


def test_another_model_never_replaces_complete_runs_silently(
        pretrained_demo: PretrainedDemo, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    shutil.copytree(pretrained_demo.out / "models", out / "models")
    assert _participant(pretrained_demo, out) == 0
    first = _done(out, "02").read_bytes()
    other = _other_model(out / "models/desc-roi", tmp_path / "other")
    assert _participant(pretrained_demo, out, "--model", str(other)) == 64
    assert "2 run(s) have complete desc-roi outputs of another model" in capsys.readouterr().err
    assert _done(out, "02").read_bytes() == first
    assert _participant(pretrained_demo, out, "--model", str(other), "--overwrite") == 0
    assert json.loads(_done(out, "02").read_text())["Model"]["SHA256"] == file_sha256(other)


def test_a_stopped_rewrite_leaves_the_run_incomplete(
        pretrained_demo: PretrainedDemo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after the new run embedding: the old completion sidecar must not vouch for it."""
    out = tmp_path / "out"
    shutil.copytree(pretrained_demo.out / "models", out / "models")
    assert _participant(pretrained_demo, out) == 0
    other = _other_model(out / "models/desc-roi", tmp_path / "other")
    write_tsv = DerivativesWriter.write_tsv

    def stop_at_region_embedding(self, path, table, *args, **kwargs):
        if "stat-region" in path.name:
            raise KeyboardInterrupt
        return write_tsv(self, path, table, *args, **kwargs)

    monkeypatch.setattr(DerivativesWriter, "write_tsv", stop_at_region_embedding)
    assert _participant(pretrained_demo, out, "--model", str(other), "--overwrite") == 130
    writer = DerivativesWriter(out)
    outputs = RunOutputs(writer, {"sub": "01", "task": "rest", "space": "MNI152NLin6Asym",
                                  "res": "2"}, "roi", "AAL3v1")
    assert outputs.completion() is None        # was complete (old model) before the rewrite
    assert not _done(out, "01").exists()


def test_the_group_level_leaves_out_features_of_a_replaced_model(
        pretrained_demo: PretrainedDemo, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    shutil.copytree(pretrained_demo.out / "models", out / "models")
    assert _participant(pretrained_demo, out) == 0
    # pretrain --overwrite put another model into models/desc-roi.
    shutil.rmtree(out / "models/desc-roi")
    _other_model(pretrained_demo.out / "models/desc-roi", out / "models/desc-roi")
    code = main([str(pretrained_demo.bids), str(out), "group", "--target", "diagnosis",
                 "--features", "global", "--compare", "roi", "--cv-folds", "2",
                 "--n-permutations", "0"])
    assert code == 66
    err = capsys.readouterr().err
    assert "every desc-roi run holds the features of a model that models/desc-roi no longer" in err


def test_the_embedder_refuses_a_model_file_that_changed(
        pretrained_demo: PretrainedDemo, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(pretrained_demo.out / "models/desc-roi", folder)
    embedder = RoimaeEmbedder(folder / "model.safetensors").fit()
    names = embedder.get_feature_names_out()
    pickled = pickle.dumps(embedder)
    assert embedder.model_ is not None            # pickling leaves the live estimator whole
    restored = pickle.loads(pickled)
    assert np.array_equal(restored.get_feature_names_out(), names)   # same file: reloaded
    shutil.rmtree(folder)
    _other_model(pretrained_demo.out / "models/desc-roi", folder)
    with pytest.raises(UsageError, match="is not the model this embedder was fitted with"):
        pickle.loads(pickled).get_feature_names_out()


def test_a_run_of_one_window_says_why_it_has_no_sensitivity(
        pretrained_demo: PretrainedDemo, tmp_path: Path) -> None:
    import nibabel as nib

    bids, out = tmp_path / "bids", tmp_path / "out"
    shutil.copytree(pretrained_demo.bids, bids)
    bold = bids / f"sub-01/func/sub-01_{PREFIX}_desc-preproc_bold.nii.gz"
    img = nib.load(bold)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[..., :10], img.affine, img.header), bold)
    shutil.copytree(pretrained_demo.out / "models", out / "models")
    assert main([str(bids), str(out), "participant", "--participant-label", "01", "--no-reports",
                 "--nprocs", "1", "--omp-nthreads", "1", "--skip-bids-validation",
                 "-w", str(tmp_path / "work")]) == 0
    func = out / "sub-01/func"
    sidecar = json.loads(next(func.glob("*_stat-occlusion_boldmap.json")).read_text())
    assert sidecar["NaNMeans"].startswith("the run has one window")
    recon = json.loads(next(func.glob("*_stat-reconerror_boldmap.json")).read_text())
    assert "no brain voxel" in recon["NaNMeans"]
    log = "".join(p.read_text() for p in (out / "logs").rglob("*.log"))
    assert "one 10-frame window: no representation sensitivity" in log


def test_a_large_atlas_is_warned_about_before_the_run(caplog: pytest.LogCaptureFixture) -> None:
    from bidsapp.participant import warn_connectivity_cost

    with caplog.at_level("WARNING"):
        warn_connectivity_cost(166, 100)             # AAL3: 1 MB a run, no warning
        assert not caplog.records
        warn_connectivity_cost(5000, 10)
    assert "5000 atlas regions" in caplog.text and "about 906 MB" in caplog.text


def test_reports_read_each_run_under_its_own_atlas_label(
        pretrained_demo: PretrainedDemo, tmp_path: Path) -> None:
    """Runs of another model under another atlas label: listed, and the report does not fail."""
    from bidsapp.outputs import complete_runs

    out = tmp_path / "out"
    shutil.copytree(pretrained_demo.out / "models", out / "models")
    assert _participant(pretrained_demo, out) == 0
    func = out / "sub-01/func"
    # The same run as another model (desc-random) with another atlas (atlas-Other) wrote it.
    for path in func.glob("*desc-roi*"):
        name = path.name.replace("desc-roi", "desc-random").replace("atlas-AAL3v1", "atlas-Other")
        shutil.copy(path, func / name)
    for path in func.glob("*atlas-AAL3v1_res-2_stat-*"):    # the model-free baseline files
        shutil.copy(path, func / path.name.replace("atlas-AAL3v1", "atlas-Other"))
    done = func / f"sub-01_{PREFIX}_desc-random_embedding.json"
    meta = json.loads(done.read_text())
    meta["Outputs"] = [n.replace("desc-roi", "desc-random").replace("atlas-AAL3v1", "atlas-Other")
                       for n in meta["Outputs"]]
    done.write_text(json.dumps(meta))
    runs = complete_runs(DerivativesWriter(out), "01", "AAL3v1")
    assert [(desc, o.region_embedding.name.split("_atlas-")[1].split("_")[0])
            for _, desc, o, _ in runs] == [("random", "Other"), ("roi", "AAL3v1")]
    assert main([str(pretrained_demo.bids), str(out), "participant", "--participant-label", "01",
                 "--nprocs", "1", "--omp-nthreads", "1", "--no-attribution",
                 "-w", str(tmp_path / "work")]) == 0
    assert "desc-random" in (out / "sub-01.html").read_text()


def test_two_atlases_of_one_label_never_share_an_output_folder(
        pretrained_demo: PretrainedDemo, tmp_path: Path, atlas_dir: Path,
        capsys: pytest.CaptureFixture) -> None:
    import pandas as pd

    out = tmp_path / "out"
    shutil.copytree(pretrained_demo.out / "models", out / "models")
    assert _participant(pretrained_demo, out) == 0
    # AAL3 with another label table: another atlas (hash), the same file name (atlas-AAL3v1).
    other = tmp_path / "aal3-renamed"
    other.mkdir()
    shutil.copy(atlas_dir / "AAL3v1_2mm.nii.gz", other)
    table = pd.read_csv(atlas_dir / "AAL3v1_labels.tsv", sep="\t", dtype=str, keep_default_na=False)
    table.loc[0, "name"] = "Renamed_L"
    table.to_csv(other / "AAL3v1_labels.tsv", sep="\t", index=False)
    atlas = ["--atlas", str(other / "AAL3v1_2mm.nii.gz"), "--atlas-labels",
             str(other / "AAL3v1_labels.tsv")]
    assert main([str(pretrained_demo.bids), str(out), "pretrain", "--masking", "random",
                 "--epochs", "1", "--window-frames", "10", "--batch-size", "2", "--nprocs", "1",
                 "--omp-nthreads", "1", "--participant-label", "01", "02", *atlas,
                 "-w", str(tmp_path / "work")]) == 0
    timeseries = next((out / "sub-01/func").glob("*_atlas-AAL3v1_res-2_stat-mean_timeseries.tsv"))
    before = timeseries.read_bytes()
    capsys.readouterr()
    assert _participant(pretrained_demo, out, "--model-desc", "random", *atlas) == 64
    assert "was written with another atlas of the label atlas-AAL3v1" in capsys.readouterr().err
    assert timeseries.read_bytes() == before
    # The group level refuses features of another atlas of its label.
    assert main([str(pretrained_demo.bids), str(out), "group", "--target", "diagnosis",
                 "--features", "global", "--compare", "roi", "fc", "--cv-folds", "2",
                 "--n-permutations", "0", *atlas]) == 65
    assert "was written with another atlas" in capsys.readouterr().err
