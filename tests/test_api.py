"""The Python API: the participant level's outputs, bit for bit, from images; the transformer."""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PretrainedDemo
from nilearn.image import resample_img
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline

import bidsapp
from bidsapp.api import RoimaeEmbedder, embed_img, embed_imgs, load_model
from bidsapp.cli import main
from bidsapp.errors import BadDataError, NoInputError, UsageError

ENTITIES = "task-rest_space-MNI152NLin6Asym"


def _run_files(bids: Path, sub: str) -> tuple[Path, Path]:
    func = bids / f"sub-{sub}" / "func"
    return (func / f"sub-{sub}_{ENTITIES}_res-2_desc-preproc_bold.nii.gz",
            func / f"sub-{sub}_{ENTITIES}_res-2_desc-brain_mask.nii.gz")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One PyTorch thread, as the command line's default: faster on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)


def test_api_equals_the_participant_level(pretrained_demo: PretrainedDemo, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(pretrained_demo.out / "models", out / "models")
    assert main([str(pretrained_demo.bids), str(out), "participant", "--participant-label", "01",
                 "--no-reports", "--nprocs", "1", "--omp-nthreads", "1", "-w", str(tmp_path / "work")]) == 0
    func = out / "sub-01" / "func"
    stem, atlas_stem = f"sub-01_{ENTITIES}_res-2_desc-roi", f"sub-01_{ENTITIES}_atlas-AAL3v1_res-2_desc-roi"

    model = bidsapp.load_model(pretrained_demo.model.parent)        # the folder works too
    assert model.card["training_data"]["runs"] == 4 and model.masking == "roi"
    bold, mask = _run_files(pretrained_demo.bids, "01")
    # Its own cache: the preprocessing runs again, from the file.
    run = embed_img(model, bold, mask, cache_dir=tmp_path / "api-work")

    windows = _tsv(func / f"{stem}_embedding.tsv")
    assert list(run.window_embeddings.columns) == list(windows.columns)
    dims = model.feature_names
    assert np.array_equal(run.window_embeddings[dims].to_numpy(),
                          windows[dims].to_numpy().astype(np.float32))
    assert np.array_equal(run.window_embeddings["onset"], windows["onset"])
    mean = _tsv(func / f"{stem}_stat-mean_embedding.tsv").to_numpy().astype(np.float32)[0]
    assert np.array_equal(run.embedding, mean)
    occluded = _tsv(func / f"{atlas_stem}_stat-occluded_embedding.tsv")
    np.testing.assert_array_equal(run.occluded_embeddings[dims].to_numpy(),
                                  occluded[dims].to_numpy().astype(np.float32))
    table = _tsv(func / f"{atlas_stem}_attribution.tsv")
    for column in ("index", "voxels", "tokens", "reconerror", "reconerror_se", "occlusion"):
        # float32 values, written with the shortest repr that reads back as the same float32
        np.testing.assert_array_equal(run.regions[column].to_numpy(dtype=np.float32),
                                      table[column].to_numpy(dtype=np.float32), err_msg=column)
    by_group = _tsv(func / f"{atlas_stem}_stat-bygroup_attribution.tsv")
    np.testing.assert_array_equal(run.by_group["group"], by_group["group"])
    np.testing.assert_allclose(run.by_group["reconerror"], by_group["reconerror"], rtol=1e-6)
    for measure in ("reconerror", "occlusion"):
        written = nib.load(func / f"{atlas_stem}_stat-{measure}_boldmap.nii.gz")
        assert np.allclose(run.maps[measure].affine, written.affine)
        np.testing.assert_array_equal(run.maps[measure].get_fdata(), written.get_fdata())
    # The readouts the group level reads: region embeddings and feature-space connectivity.
    regions = pd.read_csv(func / f"{atlas_stem}_stat-region_embedding.tsv", sep="\t", na_values="n/a")
    np.testing.assert_array_equal(run.result.region_embeddings,
                                  regions.filter(regex=r"^e\d{3}$").to_numpy(dtype=np.float64))
    relmat = pd.read_csv(func / f"{atlas_stem}_stat-pearsoncorrelation_relmat.tsv", sep="\t",
                         na_values="n/a")
    np.testing.assert_array_equal(run.result.feature_connectivity,
                                  relmat.drop(columns="Node").to_numpy(dtype=np.float64))
    assert run.eligible.shape == (166,)                  # the result's fields, as attributes
    assert run.result.recon_error is not None

    # The same run as an in-memory image: the same embedding, bit for bit.
    img = nib.load(bold)
    in_memory = nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine, img.header)
    again = embed_imgs(model, [in_memory], nib.load(mask), attribution=False)[0]
    assert np.array_equal(again.embedding, run.embedding) and again.regions is None


def test_an_image_on_a_3mm_grid_without_a_mask(pretrained_demo: PretrainedDemo) -> None:
    """A 3 mm in-memory image, no mask (nilearn's MNI152 mask): maps come back on its grid."""
    model = load_model(pretrained_demo.model)
    bold, _ = _run_files(pretrained_demo.bids, "02")
    img_3mm = resample_img(nib.load(bold), target_affine=np.diag([3.0, 3.0, 3.0]),
                           interpolation="linear", force_resample=True, copy_header=True)
    run = embed_img(model, img_3mm, t_r=2.0, n_subsets=2)
    assert run.embedding.shape == (model.n_features,) and np.isfinite(run.embedding).all()
    assert run.window_embeddings["onset"].tolist() == [0.0, 20.0]
    recon = run.maps["reconerror"]
    assert recon.shape == img_3mm.shape[:3] and np.allclose(recon.affine, img_3mm.affine)
    assert np.isfinite(recon.get_fdata()).any()


def test_bad_models_and_images_are_refused_in_one_line(pretrained_demo: PretrainedDemo,
                                                       shared_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(NoInputError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    pickle_file = tmp_path / "model.pt"
    pickle_file.write_bytes(b"not read")
    with pytest.raises(UsageError, match="pickled"):
        load_model(pickle_file)
    aal116 = shared_dir / "realdata" / "development_fmri" / "AAL_2mm_116parcel.nii.gz"
    table = tmp_path / "aal116.tsv"
    pd.DataFrame({"index": range(1, 117), "name": [f"r{i}" for i in range(1, 117)]}).to_csv(
        table, sep="\t", index=False)
    with pytest.raises(UsageError, match="another atlas"):
        load_model(pretrained_demo.model, atlas=aal116, atlas_labels=table)
    model = load_model(pretrained_demo.model)
    _, mask = _run_files(pretrained_demo.bids, "01")
    with pytest.raises(BadDataError, match="4D"):
        embed_img(model, mask, mask)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not a NIfTI")
    with pytest.raises(BadDataError, match="cannot read"):
        embed_img(model, corrupt, mask)
    with pytest.raises(UsageError, match="n_subsets"):
        embed_img(model, mask, n_subsets=3)
    bold, _ = _run_files(pretrained_demo.bids, "01")
    for t_r in (0, -2, float("nan")):
        with pytest.raises(UsageError, match="t_r must be a positive number of seconds"):
            embed_img(model, bold, mask, t_r=t_r)


def test_embedder_in_a_cross_validated_pipeline(pretrained_demo: PretrainedDemo,
                                                tmp_path: Path) -> None:
    participants = _tsv(pretrained_demo.bids / "participants.tsv")
    imgs = [str(_run_files(pretrained_demo.bids, pid.removeprefix("sub-"))[0])
            for pid in participants["participant_id"]]
    y = participants["diagnosis"].to_numpy()
    embedder = RoimaeEmbedder(str(pretrained_demo.model), memory=tmp_path / "cache")
    # scikit-learn basics: parameters, cloning, pickling (unfitted: a path; fitted: no weights).
    assert embedder.get_params()["model"] == str(pretrained_demo.model)
    assert clone(embedder).get_params() == embedder.get_params()
    assert pickle.loads(pickle.dumps(embedder)).get_params() == embedder.get_params()
    features = embedder.fit_transform(imgs)
    names = embedder.get_feature_names_out()
    assert features.shape == (len(imgs), len(names)) and names[0] == "roimae_e000"
    restored = pickle.loads(pickle.dumps(embedder))
    assert len(pickle.dumps(embedder)) < 10_000                  # the network is not pickled
    assert np.array_equal(restored.transform(imgs[:1]), features[:1])
    pipeline = make_pipeline(RoimaeEmbedder(str(pretrained_demo.model), memory=tmp_path / "cache"),
                             LogisticRegression())
    scores = cross_val_score(pipeline, imgs, y, cv=2)
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))
    with pytest.raises(UsageError, match="list of images"):
        embedder.transform(imgs[0])


def test_embedder_readouts_are_the_participant_level_readouts(pretrained_demo: PretrainedDemo,
                                                              tmp_path: Path) -> None:
    from bidsapp.readouts import vectorize

    img = str(_run_files(pretrained_demo.bids, "01")[0])
    model = load_model(pretrained_demo.model)
    run = embed_imgs(model, [img], attribution=False, cache_dir=tmp_path / "cache")[0]
    n_regions, width = len(model.atlas.regions), model.preset.embed_dim
    for readout, expected in (("region", run.result.region_embeddings.ravel()),
                              ("subregion", run.result.subregion.ravel()),
                              ("inputsubregion", run.result.input_subregion.ravel()),
                              ("connectivity", vectorize(run.result.feature_connectivity))):
        embedder = RoimaeEmbedder(str(pretrained_demo.model), readout=readout,
                                  memory=tmp_path / "cache").fit()
        features = embedder.transform([img])
        names = embedder.get_feature_names_out()
        assert features.shape == (1, len(names))
        np.testing.assert_array_equal(features[0], expected.astype(np.float32))
        if readout == "region":
            assert len(names) == n_regions * width and names[0] == "roimae_Precentral_L_e000"
        elif readout == "subregion":
            assert len(names) == n_regions * width
            assert names[0] == "roimae_Precentral_L_subregion_e000"
            # Large regions have a dispersion; small ones (under two effective tokens) n/a.
            by_region = features[0].reshape(n_regions, width)
            assert 40 <= np.isfinite(by_region).all(axis=1).sum() < n_regions
        elif readout == "inputsubregion":
            assert names[0] == "roimae_Precentral_L_inputsubregion_e000"
            # The same regions as the model's subregion readout have a value.
            subregion = run.result.subregion
            assert len(names) == n_regions
            np.testing.assert_array_equal(np.isfinite(features[0]),
                                          np.isfinite(subregion).all(axis=1))
        else:
            assert len(names) == n_regions * (n_regions - 1) // 2
            assert names[0] == "roimae_Precentral_L__Precentral_R"
    with pytest.raises(UsageError, match="readout 'mean'"):
        RoimaeEmbedder(str(pretrained_demo.model), readout="mean").fit()


def test_a_model_pretrained_at_a_target_tr_reads_runs_as_it_was_trained(
        pretrained_demo: PretrainedDemo, tmp_path: Path) -> None:
    """The participant level resamples to the model's --target-tr, as embed_img does."""
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--participant-label", "01", "--nprocs", "1", "--omp-nthreads", "1", "-w", str(work)]
    assert main([str(pretrained_demo.bids), str(out), "pretrain", "--epochs", "1",
                 "--window-frames", "10", "--batch-size", "2", "--target-tr", "1.0",
                 "--participant-label", "01", "02", "--nprocs", "1", "--omp-nthreads", "1",
                 "-w", str(work)]) == 0
    assert main([str(pretrained_demo.bids), str(out), "participant", "--no-reports",
                 "--no-attribution", *common]) == 0
    windows = _tsv(out / "sub-01" / "func" / f"sub-01_{ENTITIES}_res-2_desc-roi_embedding.tsv")
    model = load_model(out / "models" / "desc-roi")
    assert model.target_tr == 1.0
    run = embed_img(model, *_run_files(pretrained_demo.bids, "01"), attribution=False,
                    cache_dir=work)
    # 20 frames at TR 2 s are 40 at TR 1 s: four 10-frame windows, 10 s apart.
    assert len(windows) == len(run.window_embeddings) == 4
    np.testing.assert_array_equal(windows["onset"], [0.0, 10.0, 20.0, 30.0])
    np.testing.assert_array_equal(run.window_embeddings[model.feature_names].to_numpy(),
                                  windows[model.feature_names].to_numpy().astype(np.float32))
    # Another --target-tr on the command line wins, with a warning.
    assert main([str(pretrained_demo.bids), str(tmp_path / "other"), "participant",
                 "--model", str(model.path), "--target-tr", "2.0", "--no-reports",
                 "--no-attribution", *common]) == 0
    other = _tsv(tmp_path / "other" / "sub-01" / "func" / f"sub-01_{ENTITIES}_res-2_desc-roi_embedding.tsv")
    assert len(other) == 2
    logs = "".join(p.read_text() for p in (tmp_path / "other" / "logs").rglob("*.log"))
    assert "--target-tr 2 s overrides the model's 1 s" in logs
