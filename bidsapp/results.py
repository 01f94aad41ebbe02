"""One analysed run -> every table, map and summary roimae reports for it.

:func:`run_embedding` is the one path from :func:`bidsapp.inference.analyse_run` to results:
the participant level writes its fields (:func:`bidsapp.participant.write_run`, a loop of
writes) and the Python API returns them (:func:`bidsapp.api.embed_img`), so the two cannot
drift apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from bidsapp.atlas import Atlas, group_summary, region_map, region_voxels
from bidsapp.cache import CachedRun
from bidsapp.grid import cube_atlas
from bidsapp.inference import RoimaeModel, RunAttribution
from bidsapp.outputs import NOTE_CANNOT_BE_HIDDEN, NOTE_HIDDEN_BY_VOXEL, embedding_frame, relmat_frame
from bidsapp.readouts import correlation_matrix, region_timeseries

__all__ = ["MAPPED_MEASURES", "RunEmbedding", "region_table", "run_embedding"]

#: The per-region measures of the attribution table that are also drawn as maps.
MAPPED_MEASURES = ("reconerror", "reconerror_se", "occlusion")


@dataclass
class RunEmbedding:
    """What roimae reads out of one run (R regions, C embedding dimensions, W windows).

    Attributes
    ----------
    window_embeddings : pandas.DataFrame
        One row per window: ``window``, ``onset`` (s), ``e000``... (``_embedding.tsv``).
    embedding : numpy.ndarray, shape (C,)
        The run embedding, the mean of the window embeddings (``_stat-mean_embedding.tsv``).
    region_embedding_table : pandas.DataFrame
        One row per region: ``index``, ``name``, its features at the encoder's finest stage
        averaged over frames (``_stat-region_embedding.tsv``).
    subregion_table : pandas.DataFrame
        One row per region: ``index``, ``name``, the log within-region dispersion of its token
        features per channel (:func:`~bidsapp.readouts.within_region_dispersion`; NaN for a
        region with fewer than two effective tokens) (``_stat-subregion_embedding.tsv``).
    input_subregion_table : pandas.DataFrame
        The same statistic of the model's input averaged per token, one column ``e000``: what
        it finds without the model (``_stat-inputsubregion_embedding.tsv``).
    connectivity_table : pandas.DataFrame
        Region x region correlation of the region features over frames, with a ``Node`` column
        (``_desc-<m>_stat-pearsoncorrelation_relmat.tsv``).
    timeseries : pandas.DataFrame
        The functional-connectivity baseline: each region's mean signal, one row per frame
        (``_stat-mean_timeseries.tsv``).
    fc_table : pandas.DataFrame
        Their Pearson correlations (``_stat-pearsoncorrelation_relmat.tsv``, no ``desc``).
    regions : pandas.DataFrame or None
        With attribution: one row per region, its identity, size and measures
        (``_attribution.tsv``: ``reconerror``, ``reconerror_se``, ``occlusion``, ``note``).
    by_group : pandas.DataFrame or None
        The measures by region group (``_stat-bygroup_attribution.tsv``), when the atlas has
        groups.
    occluded_embeddings : pandas.DataFrame or None
        One row per region: the run embedding with the region hidden.
    maps : dict of str to nibabel.Nifti1Image
        Each of :data:`MAPPED_MEASURES` as a 3D map on the run's grid (NaN: a region the model
        cannot hide), e.g. ``maps["reconerror"]``, ``maps["occlusion"]``.
    result : bidsapp.inference.RunAttribution
        Everything :func:`~bidsapp.inference.analyse_run` computed; its fields are also readable
        as attributes of this object (``run.eligible``, ``run.example``, ...).
    repetition_time : float or None
        Seconds between the frames the model saw.
    n_frames : int
        Frames of the preprocessed run (after any resampling in time).
    """

    window_embeddings: pd.DataFrame
    embedding: np.ndarray
    region_embedding_table: pd.DataFrame
    subregion_table: pd.DataFrame
    input_subregion_table: pd.DataFrame
    connectivity_table: pd.DataFrame
    timeseries: pd.DataFrame
    fc_table: pd.DataFrame
    regions: pd.DataFrame | None
    by_group: pd.DataFrame | None
    occluded_embeddings: pd.DataFrame | None
    maps: dict[str, nib.Nifti1Image]
    result: RunAttribution = field(repr=False)
    repetition_time: float | None = None
    n_frames: int = 0

    def __getattr__(self, name: str) -> Any:
        # Readouts of the result that have no attribute of their own here.
        if name != "result" and "result" in self.__dict__:
            with contextlib.suppress(AttributeError):
                return getattr(self.__dict__["result"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def region_table(atlas: Atlas, model: RoimaeModel, result: RunAttribution,
                 voxels: np.ndarray) -> pd.DataFrame:
    """The attribution table of one run: identity, size and each measure, one row per region.

    Parameters
    ----------
    atlas : bidsapp.atlas.Atlas
    model : bidsapp.inference.RoimaeModel
        The model, for the number of tokens each region owns on its grid.
    result : bidsapp.inference.RunAttribution
        The run's attribution (``recon_error`` not None).
    voxels : ndarray of int, shape (R,)
        Each region's voxels on the run's grid.

    Returns
    -------
    pandas.DataFrame
        The atlas table with ``voxels``, ``tokens``, ``reconerror``, ``reconerror_se``,
        ``occlusion`` and ``note`` (:data:`~bidsapp.outputs.NOTE_CANNOT_BE_HIDDEN`,
        :data:`~bidsapp.outputs.NOTE_HIDDEN_BY_VOXEL` or ``n/a``).
    """
    table = atlas.table().copy()
    labels = model.region_grid.token_labels.flatten()
    tokens = np.bincount(labels[labels >= 0].cpu().numpy(), minlength=len(atlas.regions))
    table["voxels"] = voxels
    table["tokens"] = tokens
    table["reconerror"] = result.recon_error
    table["reconerror_se"] = result.recon_error_se
    table["occlusion"] = result.occlusion
    table["note"] = np.select(
        [~result.eligible, tokens == 0],
        [NOTE_CANNOT_BE_HIDDEN, NOTE_HIDDEN_BY_VOXEL], "n/a")
    return table


def _per_region(atlas: Atlas, values: np.ndarray) -> pd.DataFrame:
    """``index``, ``name`` and ``e000``... of an (R, C) region readout."""
    table = embedding_frame(values)
    table.insert(0, "name", [region.name for region in atlas.regions])
    table.insert(0, "index", [region.index for region in atlas.regions])
    return table


def run_embedding(model: RoimaeModel, cached: CachedRun, result: RunAttribution,
                  shape: Sequence[int], affine: np.ndarray) -> RunEmbedding:
    """Every table and map of one analysed run.

    Parameters
    ----------
    model : bidsapp.inference.RoimaeModel
    cached : bidsapp.cache.CachedRun
        The preprocessed run.
    result : bidsapp.inference.RunAttribution
        :func:`~bidsapp.inference.analyse_run` of ``cached``.
    shape, affine : sequence of int, numpy.ndarray
        The grid of the input image, for the maps.

    Returns
    -------
    RunEmbedding
    """
    atlas = model.atlas
    names = [region.name for region in atlas.regions]
    tr = cached.repetition_time
    windows = embedding_frame(result.window_embeddings)
    windows.insert(0, "onset", np.arange(len(windows)) * model.window_frames * tr
                   if tr is not None else np.nan)
    windows.insert(0, "window", np.arange(len(windows)))
    region_features, subregion, input_subregion = (
        _per_region(atlas, values)
        for values in (result.region_embeddings, result.subregion, result.input_subregion))
    timeseries = region_timeseries(cached, cube_atlas(atlas))
    regions = by_group = occluded = None
    maps: dict[str, nib.Nifti1Image] = {}
    if result.recon_error is not None:
        contiguous = atlas.contiguous(atlas.resample_to(tuple(shape[:3]), affine))
        regions = region_table(atlas, model, result, region_voxels(contiguous, len(atlas.regions)))
        occluded = _per_region(atlas, result.occluded_embeddings)
        maps = {c: region_map(regions[c].to_numpy(), contiguous, affine) for c in MAPPED_MEASURES}
        if atlas.has_groups:
            by_group = group_summary(regions, ("reconerror", "occlusion"))
    return RunEmbedding(
        window_embeddings=windows, embedding=result.embedding,
        region_embedding_table=region_features, subregion_table=subregion,
        input_subregion_table=input_subregion,
        connectivity_table=relmat_frame(result.feature_connectivity, names),
        timeseries=pd.DataFrame(timeseries, columns=names),
        fc_table=relmat_frame(correlation_matrix(timeseries), names),
        regions=regions, by_group=by_group, occluded_embeddings=occluded, maps=maps,
        result=result, repetition_time=tr, n_frames=cached.n_frames)
