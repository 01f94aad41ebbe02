"""roimae from Python: load a pretrained model, embed and attribute niimg-like images.

The functions here run exactly what the participant level runs, on images instead of a BIDS
dataset: the checkpoint checks of :func:`bidsapp.inference.load_model`, the preprocessing and
cache of :func:`bidsapp.preprocess.prepare_run`, the encoder and attribution of
:func:`bidsapp.inference.analyse_run`, and the region tables and maps of
:mod:`bidsapp.outputs` and :mod:`bidsapp.atlas`. Embeddings are therefore those the participant
level writes, bit for bit on the CPU.

Examples
--------
>>> from bidsapp import load_model, embed_img                                  # doctest: +SKIP
>>> model = load_model("out/models/desc-roi/model.safetensors")                 # doctest: +SKIP
>>> run = embed_img(model, "sub-01_..._desc-preproc_bold.nii.gz",               # doctest: +SKIP
...                 mask_img="sub-01_..._desc-brain_mask.nii.gz")
>>> run.embedding.shape, run.regions[["name", "reconerror"]].head()             # doctest: +SKIP
>>> run.maps["occlusion"].to_filename("occlusion.nii.gz")                       # doctest: +SKIP
>>> neurostorm = load_model("out/models/desc-neurostorm")   # roimae import-model  # doctest: +SKIP
>>> stages = neurostorm.encode(x)   # x: (B, 1, 96, 96, 96, 20), upstream's layout  # doctest: +SKIP
>>> reconstruction = neurostorm.decode(stages[-1])                              # doctest: +SKIP

:class:`RoimaeEmbedder` wraps this as a scikit-learn transformer (images -> run embeddings).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from bidsapp.atlas import Atlas, load_atlas
from bidsapp.config import READOUTS
from bidsapp.errors import BadDataError, NoInputError, UsageError
from bidsapp.features import feature_names, run_features
from bidsapp.grid import mni_brain_mask
from bidsapp.inference import RoimaeModel, analyse_run
from bidsapp.inference import load_model as _load_checkpoint
from bidsapp.preprocess import prepare_run
from bidsapp.results import RunEmbedding, run_embedding
from bidsapp.runtime import resolve_device, seed_everything

__all__ = ["RoimaeEmbedder", "RoimaeModel", "RunEmbedding", "embed_img", "embed_imgs",
           "load_model"]

#: A path to a NIfTI file or a nibabel image (nilearn's "niimg-like", without globs).
NiimgLike = str | Path | nib.spatialimages.SpatialImage


def load_model(path: str | Path, *, atlas: Atlas | str | Path | None = None,
               atlas_labels: str | Path | None = None, device: str = "cpu") -> RoimaeModel:
    """Load a pretrained model, with the participant level's checks.

    Parameters
    ----------
    path : str or Path
        ``model.safetensors`` (with its ``model.json`` sidecar beside it), or the folder holding
        them (e.g. ``OUTPUT_DIR/models/desc-roi``, or ``models/desc-neurostorm`` written by
        ``roimae import-model``). Pickled checkpoints are refused.
    atlas : Atlas, str or Path, optional
        The atlas the model was pretrained with: an :class:`~bidsapp.atlas.Atlas`, or a label
        image given with ``atlas_labels``. By default AAL3, found as the command line finds it
        (``$ROIMAE_ATLAS_DIR``, then nilearn).
    atlas_labels : str or Path, optional
        The label table of an ``atlas`` image.
    device : {"cpu", "cuda", "auto"}
        Where the model runs.

    Returns
    -------
    RoimaeModel
        For an imported SwiFT or NeuroSTORM model, ``model.encode(x)`` gives upstream's stage
        outputs for ``x (B, 1, 96, 96, 96, T)`` and ``model.decode(z)`` NeuroSTORM's
        reconstruction (:meth:`~bidsapp.inference.RoimaeModel.encode`).

    Raises
    ------
    bidsapp.errors.RoimaeError
        As the participant level: no such file, not a safetensors checkpoint, a hash that does
        not match its sidecar, weights that do not fit their preset, or another atlas than the
        model's (:class:`~bidsapp.errors.UsageError`).
    """
    if not isinstance(atlas, Atlas):
        atlas = load_atlas(None if atlas is None else Path(atlas),
                           None if atlas_labels is None else Path(atlas_labels))
    return _load_checkpoint(Path(path), atlas, resolve_device(device))


@contextlib.contextmanager
def _work_dir(cache_dir: str | Path | None) -> Iterator[Path]:
    if cache_dir is not None:
        yield Path(cache_dir)
        return
    with tempfile.TemporaryDirectory(prefix="roimae-") as tmp:
        yield Path(tmp)


def _as_file(img: NiimgLike, folder: Path, name: str) -> Path:
    """A NIfTI file holding ``img``: the path itself, or the in-memory image saved in ``folder``."""
    if isinstance(img, str | Path):
        return Path(img)
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise UsageError(f"expected a NIfTI path or a nibabel image, not {type(img).__name__}")
    path = folder / f"{name}.nii"
    # The values as they are (scaled, in their own type): the input's header type and scaling
    # would quantize them again. Voxel sizes and units carry the TR.
    data = np.asanyarray(img.dataobj)
    saved = nib.Nifti1Image(data, img.affine)
    saved.header.set_zooms(img.header.get_zooms()[:data.ndim])
    saved.header.set_xyzt_units(*img.header.get_xyzt_units())
    nib.save(saved, path)
    return path


def _header(path: Path) -> nib.spatialimages.SpatialImage:
    """The image with its header read (its data are read by :func:`prepare_run`)."""
    if not path.is_file():
        raise NoInputError(f"{path} does not exist")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for files it cannot read
        raise BadDataError(f"cannot read {path}: {exc}") from exc
    if len(img.shape) != 4:
        raise BadDataError(f"{path}: expected a 4D BOLD series, got shape {img.shape}")
    return img


def _brain_mask(bold: Path, folder: Path) -> Path:
    """The MNI152 brain mask (:func:`bidsapp.grid.mni_brain_mask`) on the grid of ``bold``."""
    header = _header(bold)
    data = mni_brain_mask(header.shape, header.affine).astype(np.uint8)
    path = folder / "mask.nii"
    nib.save(nib.Nifti1Image(data, header.affine), path)
    return path


def embed_img(model: RoimaeModel, img: NiimgLike, mask_img: NiimgLike | None = None, *,
              t_r: float | None = None, target_tr: float | str | None = "model",
              attribution: bool = True, n_subsets: int = 6, seed: int = 0,
              cache_dir: str | Path | None = None) -> RunEmbedding:
    """Embed one 4D fMRI image and, optionally, attribute it to the atlas regions.

    Parameters
    ----------
    model : RoimaeModel
        From :func:`load_model`.
    img : str, Path or nibabel image
        A 4D BOLD series in MNI space, on any grid the command line accepts (the MNI 2 mm grid,
        fMRIPrep's ``res-2``, 1 or 3 mm: brought to the model grid as there).
    mask_img : str, Path or nibabel image, optional
        Its brain mask, on the same grid. By default nilearn's MNI152 brain mask
        (:func:`nilearn.datasets.load_mni152_brain_mask`) on the image's grid
        (:func:`bidsapp.grid.mni_brain_mask`).
    t_r : float, optional
        Repetition time in seconds; by default the NIfTI header's.
    target_tr : float, None or "model"
        Resample in time to this TR; ``"model"`` (default) uses the model's training TR.
    attribution : bool
        Also compute per-region attribution (``n_subsets + 1`` encoder passes per window instead
        of one).
    n_subsets : int
        Region subsets per window (``--attribution-subsets``); even, at least 2.
    seed : int
        Seed of the region subsets (``--random-seed``).
    cache_dir : str or Path, optional
        Work directory whose ``cache/`` keeps the preprocessed runs for reuse (the command line's
        ``-w``); a temporary directory by default.

    Returns
    -------
    RunEmbedding

    Raises
    ------
    bidsapp.errors.RoimaeError
        Bad input, as at the participant level: a missing or corrupt file, BOLD not in MNI space
        or shorter than a window, a mask on another grid, an unknown TR when resampling in time.

    Notes
    -----
    As the participant level, this seeds PyTorch (:func:`bidsapp.runtime.seed_everything`) and
    turns on its deterministic algorithms.
    """
    if n_subsets < 2 or n_subsets % 2:
        raise UsageError(f"n_subsets must be even and at least 2, not {n_subsets}")
    if t_r is not None and not (np.isfinite(t_r) and t_r > 0):
        raise UsageError(f"t_r must be a positive number of seconds, not {t_r}")
    params = model.preprocess_params(target_tr)
    with _work_dir(cache_dir) as work, tempfile.TemporaryDirectory(prefix="roimae-in-") as tmp:
        bold = _as_file(img, Path(tmp), "bold")
        grid = _header(bold)
        mask = _brain_mask(bold, Path(tmp)) if mask_img is None else _as_file(mask_img, Path(tmp),
                                                                              "mask")
        cached = prepare_run(bold, mask, work / "cache", params, t_r)
        seed_everything(seed)
        result = analyse_run(model, cached, attribution=attribution, n_subsets=n_subsets,
                             seed=seed)
        return run_embedding(model, cached, result, grid.shape, grid.affine)


def embed_imgs(model: RoimaeModel, imgs: Sequence[NiimgLike],
               mask_imgs: NiimgLike | Sequence[NiimgLike | None] | None = None,
               **kwargs: Any) -> list[RunEmbedding]:
    """:func:`embed_img` of each image.

    Parameters
    ----------
    model : RoimaeModel
    imgs : sequence of niimg-like
    mask_imgs : niimg-like or sequence of niimg-like, optional
        One mask for all images, one per image, or none.
    **kwargs
        Passed to :func:`embed_img`.

    Returns
    -------
    list of RunEmbedding
    """
    if mask_imgs is None or isinstance(mask_imgs, str | Path | nib.spatialimages.SpatialImage):
        mask_imgs = [mask_imgs] * len(imgs)
    if len(mask_imgs) != len(imgs):
        raise UsageError(f"{len(imgs)} images but {len(mask_imgs)} masks")
    return [embed_img(model, img, mask, **kwargs) for img, mask in zip(imgs, mask_imgs, strict=True)]


class RoimaeEmbedder(TransformerMixin, BaseEstimator):
    """Images -> features of a pretrained model, as a scikit-learn transformer.

    Parameters
    ----------
    model : str or Path
        ``model.safetensors`` of a pretrained roimae model (or its folder).
    readout : {"global", "region", "subregion", "inputsubregion", "connectivity"}
        The features, as the group level's ``--features``: the run embedding, the region
        embeddings (regions x channels, flattened), the within-region dispersions (regions x
        channels; NaN for a region under two effective tokens), the same statistic of the
        model's input (one per region, no model features), or the Fisher z of the
        connectivity of the region features (upper triangle; NaN for a region without varying
        features). Put a :class:`~sklearn.impute.SimpleImputer` before a classifier that needs
        finite values.
    atlas, atlas_labels : str or Path, optional
        The atlas the model was pretrained with (default AAL3), as in :func:`load_model`.
    mask_img : niimg-like, optional
        One brain mask for every image; by default nilearn's MNI152 brain mask.
    t_r : float, optional
        Repetition time of the images (default: each header's).
    device : {"cpu", "cuda", "auto"}
    memory : str or Path, optional
        Work directory keeping the preprocessed images between calls (as nilearn's ``memory``,
        but a folder, not a joblib ``Memory``): cross-validation then preprocesses each image
        once. By default nothing is kept.
    seed : int
        Random seed.

    Attributes
    ----------
    model_ : RoimaeModel
        The loaded model (after :meth:`fit`).
    model_sha256_ : str
        The SHA-256 of its weights: an unpickled embedder refuses a file that changed since.
    n_features_out_ : int
        Number of features of the readout.

    Notes
    -----
    ``fit`` learns nothing: it loads the pretrained model. There is no ``n_jobs``: the encoder
    uses PyTorch's threads (``torch.set_num_threads``); run folds in parallel with
    ``cross_val_score(..., n_jobs=...)`` instead. The estimator holds only the model's
    path until then, so it clones and pickles cheaply; a fitted one pickles without the network,
    which is reloaded from the path when needed.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression                      # doctest: +SKIP
    >>> from sklearn.model_selection import cross_val_score                      # doctest: +SKIP
    >>> from sklearn.pipeline import make_pipeline                               # doctest: +SKIP
    >>> pipe = make_pipeline(RoimaeEmbedder("model.safetensors"), LogisticRegression())  # doctest: +SKIP
    >>> cross_val_score(pipe, bold_paths, diagnosis, cv=5)                       # doctest: +SKIP
    """

    def __init__(self, model: str | Path | None = None, *, readout: str = "global",
                 atlas: str | Path | None = None, atlas_labels: str | Path | None = None,
                 mask_img: NiimgLike | None = None, t_r: float | None = None, device: str = "cpu",
                 memory: str | Path | None = None, seed: int = 0) -> None:
        self.model = model
        self.readout = readout
        self.atlas = atlas
        self.atlas_labels = atlas_labels
        self.mask_img = mask_img
        self.t_r = t_r
        self.device = device
        self.memory = memory
        self.seed = seed

    def fit(self, X: Sequence[NiimgLike] | None = None, y: Any = None) -> RoimaeEmbedder:
        """Load the pretrained model (nothing is learnt from ``X``).

        Parameters
        ----------
        X : sequence of niimg-like, optional
            Ignored.
        y : ignored

        Returns
        -------
        RoimaeEmbedder
        """
        if self.model is None:
            raise UsageError("RoimaeEmbedder needs the path of a pretrained model")
        if self.readout not in READOUTS:
            raise UsageError(f"readout {self.readout!r}: choose one of {', '.join(READOUTS)}")
        self.model_ = load_model(self.model, atlas=self.atlas, atlas_labels=self.atlas_labels,
                                 device=self.device)
        self.model_sha256_ = self.model_.sha256
        self.n_features_out_ = len(self._names())
        return self

    def _fitted_model(self) -> RoimaeModel:
        """The model of :meth:`fit`, reloaded after unpickling; refused if its file changed."""
        if getattr(self, "model_", None) is None:
            model = load_model(self.model, atlas=self.atlas, atlas_labels=self.atlas_labels,
                               device=self.device)
            if model.sha256 != self.model_sha256_:
                raise UsageError(f"{model.path} is not the model this embedder was fitted with "
                                 f"(SHA-256 {model.sha256[:12]}..., fitted with "
                                 f"{self.model_sha256_[:12]}...): fit it again")
            self.model_ = model
        return self.model_

    def _names(self) -> list[str]:
        model = self.model_
        per_region = len(model.atlas.regions) * model.preset.embed_dim
        width = {"global": model.n_features, "region": per_region, "subregion": per_region,
                 "inputsubregion": len(model.atlas.regions), "connectivity": 0}[self.readout]
        return feature_names(self.readout, [region.name for region in model.atlas.regions], width)

    def transform(self, X: Sequence[NiimgLike]) -> np.ndarray:
        """The run embedding of each image.

        Parameters
        ----------
        X : sequence of niimg-like
            4D BOLD images in MNI space (paths or nibabel images).

        Returns
        -------
        numpy.ndarray, shape (n_images, n_features_out_), float32
        """
        check_is_fitted(self, "n_features_out_")
        if isinstance(X, str | Path | nib.spatialimages.SpatialImage):
            raise UsageError("X must be a list of images, not a single image")
        runs = embed_imgs(self._fitted_model(), list(X), self.mask_img, t_r=self.t_r, attribution=False,
                          seed=self.seed, cache_dir=self.memory)
        rows = [run_features(self.readout, run) for run in runs]
        return np.vstack(rows).astype(np.float32, copy=False)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names of the output features.

        ``roimae_e000``... (global), ``roimae_<region>_e000``... (region),
        ``roimae_<region>__<region>`` (connectivity).

        Returns
        -------
        numpy.ndarray of str
        """
        check_is_fitted(self, "n_features_out_")
        self._fitted_model()
        return np.asarray(self._names(), dtype=object)

    def __getstate__(self) -> dict[str, Any]:
        # The network is not pickled: a fitted embedder reloads it from ``model`` (and checks its
        # hash). A copy: pickling must not drop the live estimator's network.
        state = dict(super().__getstate__())
        state["model_"] = None
        return state
