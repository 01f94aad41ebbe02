"""Region readouts of a model's token features, and the functional-connectivity baseline.

A window embedding averages the last stage over every token and frame, which keeps a baseline
shift but averages away differences of amplitude and covariance between regions. The readouts
below keep them. From the finest stage of the encoder (one token per ``p^3`` working voxels and
frame), features are pooled per atlas region and frame:

- :class:`RegionPooling`: region r's feature at a frame is the mean of the token features weighted
  by the share of r's atlas voxels (2 mm cube) each token holds, so every region with voxels gets
  a feature, also regions too small to own a token;
- :func:`region_embedding`: the mean over frames, ``(R, C)``;
- :func:`feature_correlation`: for every channel, the Pearson correlation between two regions'
  features over frames, averaged over channels, ``(R, R)``: functional connectivity in the
  model's feature space;
- :func:`within_region_dispersion` (:class:`DispersionSums` over windows): how far each of the
  region's tokens moves away from the region's mean token over frames, per channel, ``(R, C)``:
  structure *inside* a region, which every region mean (hence ``region``, ``connectivity`` and
  the baselines) averages away by construction. Its tokens are weighted by :func:`dispersion_weights`.

The baseline (:func:`region_timeseries`, :func:`correlation_matrix`) is what a researcher would
compute without roimae: region mean signals of the same preprocessed run and their Pearson
correlations through nilearn's :class:`~nilearn.connectome.ConnectivityMeasure`. For
classification, correlation matrices enter as the Fisher z of their upper triangle
(:func:`vectorize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from nilearn.connectome import ConnectivityMeasure
from scipy import sparse
from sklearn.covariance import EmpiricalCovariance

from bidsapp.cache import CachedRun
from bidsapp.grid import CubeAtlas
from bidsapp.model.layers import blocks

#: Frames per chunk when region means are read from the cache (bounds float32 memory).
_CHUNK_FRAMES = 64
#: Exponent ``q`` of a token's purity in :func:`dispersion_weights` (chosen by measurement on the
#: demo's ``subregional`` effect, docs/science.md: 1 to 4 and "owned tokens" were tried).
PURITY_EXPONENT = 3
#: Fewest effective tokens (``1 / sum of squared weights``) a region needs for a dispersion.
MIN_EFFECTIVE_TOKENS = 2.0


@dataclass(frozen=True)
class RegionPooling:
    """Token features -> region features, by the share of each region's voxels in each token.

    The weights are kept sparse, as ``(region, token, weight)`` triples, and summed in float64 in
    a fixed order, so that region features are bit-identical whatever the number of threads.

    Attributes
    ----------
    regions, tokens : torch.LongTensor, shape (M,)
        The region and token of each nonzero weight.
    weights : torch.DoubleTensor, shape (M,)
        The number of the region's voxels (2 mm cube) inside the token, over the region's voxels;
        a region's weights sum to 1.
    n_regions : int
    """

    regions: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor
    n_regions: int

    @classmethod
    def from_atlas(cls, cube: CubeAtlas, token_edge: int) -> RegionPooling:
        """Weights for tokens of ``token_edge`` cube voxels per side (``patch * downsample``)."""
        regions, tokens, counts = _token_counts(cube, token_edge)
        totals = np.bincount(regions, weights=counts, minlength=cube.n_regions)
        return cls(torch.from_numpy(regions), torch.from_numpy(tokens),
                   torch.from_numpy(counts / totals[regions]), cube.n_regions)

    def to(self, device: torch.device | str) -> RegionPooling:
        """Return a copy on ``device``."""
        return RegionPooling(self.regions.to(device), self.tokens.to(device),
                             self.weights.to(device), self.n_regions)

    def __call__(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Pool ``tokens (T', gd, gh, gw, C)`` of one window to regions.

        Parameters
        ----------
        tokens : torch.Tensor, shape (T', gd, gh, gw, C)
        valid : torch.BoolTensor, shape (gd, gh, gw)
            Tokens that carry features; the weights are renormalised over them.

        Returns
        -------
        torch.Tensor, shape (T', R, C), float64
            NaN for a region none of whose voxels lies in a valid token.
        """
        steps, channels = tokens.shape[0], tokens.shape[-1]
        keep = valid.flatten()[self.tokens]  # (M,)
        weights = torch.where(keep, self.weights, torch.zeros_like(self.weights))
        total = torch.zeros(self.n_regions, dtype=weights.dtype, device=weights.device)
        total.index_add_(0, self.regions, weights)  # (R,)
        rows = tokens.flatten(1, 3).transpose(0, 1).reshape(-1, steps * channels)  # (N, T'*C)
        values = rows.to(torch.float64)[self.tokens] * weights[:, None]  # (M, T'*C)
        pooled = torch.zeros(self.n_regions, steps * channels, dtype=torch.float64,
                             device=tokens.device)
        pooled.index_add_(0, self.regions, values)  # (R, T'*C), summed in index order
        pooled = pooled / total.clamp_min(1e-12)[:, None]
        pooled = pooled.masked_fill((total == 0)[:, None], float("nan"))
        return pooled.reshape(self.n_regions, steps, channels).transpose(0, 1)


def _token_counts(cube: CubeAtlas, token_edge: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(region, token, voxels)`` of every region with voxels in a token (2 mm cube voxels)."""
    labels = cube.voxel_labels.astype(np.int64)
    size = labels.shape[0]
    if any(n != size or n % token_edge for n in labels.shape):
        raise ValueError(f"a cube {labels.shape} does not tile into {token_edge}-voxel tokens")
    per_token = blocks(torch.from_numpy(labels), token_edge).flatten(0, 2).numpy()  # (N, e^3)
    n_tokens = per_token.shape[0]
    token, voxel = np.nonzero(per_token >= 0)
    pairs, counts = np.unique(per_token[token, voxel] * n_tokens + token, return_counts=True)
    regions, tokens = np.divmod(pairs, n_tokens)
    return regions, tokens, counts


def dispersion_weights(cube: CubeAtlas, token_edge: int, exponent: float = PURITY_EXPONENT,
                       min_effective_tokens: float = MIN_EFFECTIVE_TOKENS) -> RegionPooling:
    """Token weights of :func:`within_region_dispersion`: the region's own tokens count most.

    Token ``j`` holds ``n_rj`` of region ``r``'s voxels (2 mm cube) of its ``e^3``; its weight in
    ``r`` is ``n_rj * (n_rj / e^3) ** exponent``, normalised to sum 1 over ``r``'s tokens: the
    pooling weight (share of the region's voxels) times the token's purity (share of the token
    that is the region) to the power ``exponent``. A token the region shares with its
    neighbours carries their signals, which differ from the region's whatever happens inside
    it; purity keeps them from swamping the region's own structure. Regions with fewer than
    ``min_effective_tokens`` effective tokens (``1 / sum_j v_rj^2``) have no within-region
    structure at this token size and get no weight at all (their dispersion is NaN).

    Parameters
    ----------
    cube : CubeAtlas
    token_edge : int
        Token edge in cube voxels (``patch * downsample``: 8 for ``tiny``, 6 for ``small``).
    exponent : float
        ``q`` above (0: the pooling weights of :class:`RegionPooling`).
    min_effective_tokens : float

    Returns
    -------
    RegionPooling
        The weights as ``(region, token, weight)`` triples, in the layout of
        :meth:`RegionPooling.from_atlas` (used as such, it pools by these weights).
    """
    regions, tokens, counts = _token_counts(cube, token_edge)
    weights = counts * (counts / token_edge**3) ** exponent
    totals = np.bincount(regions, weights=weights, minlength=cube.n_regions)  # (R,)
    weights = weights / totals[regions]
    effective = 1 / np.bincount(regions, weights=weights**2, minlength=cube.n_regions).clip(1e-300)
    keep = effective[regions] >= min_effective_tokens
    return RegionPooling(torch.from_numpy(regions[keep]), torch.from_numpy(tokens[keep]),
                         torch.from_numpy(weights[keep]), cube.n_regions)


class DispersionSums:
    """Running per-token moments for :func:`within_region_dispersion`, added window by window.

    For every (region, token) pair of the weights and every channel: the number of frames, the
    mean and the sum of squared deviations (Chan et al.'s pairwise update, stable in float64)
    of the token's feature minus the region's weighted mean token. Memory: three ``(M, C)``
    float64 arrays (M pairs), whatever the run's length.

    Parameters
    ----------
    weights : RegionPooling
        From :func:`dispersion_weights`.
    """

    def __init__(self, weights: RegionPooling) -> None:
        self.weights = weights
        self.frames = 0
        self.mean: torch.Tensor | None = None   # (M, C)
        self.m2: torch.Tensor | None = None     # (M, C)
        self.pair_weights: torch.Tensor | None = None  # (M,) renormalised over valid tokens

    def add(self, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Add one window's token features.

        Parameters
        ----------
        tokens : torch.Tensor, shape (T', gd, gh, gw, C)
        valid : torch.BoolTensor, shape (gd, gh, gw)
            Tokens that carry features; the weights are renormalised over them (as
            :class:`RegionPooling` does), the same for every window of a run.
        """
        w = self.weights
        keep = valid.flatten()[w.tokens]                                        # (M,)
        weights = torch.where(keep, w.weights, torch.zeros_like(w.weights))
        total = torch.zeros(w.n_regions, dtype=weights.dtype, device=weights.device)
        total.index_add_(0, w.regions, weights)                                 # (R,)
        weights = weights / total.clamp_min(1e-300)[w.regions]
        if self.pair_weights is None:
            self.pair_weights = weights
        elif not torch.equal(self.pair_weights, weights):
            raise ValueError("the valid tokens changed between windows of one run")
        x = tokens.flatten(1, 3).to(torch.float64)[:, w.tokens]                # (T', M, C)
        centre = torch.zeros(x.shape[0], w.n_regions, x.shape[2], dtype=torch.float64,
                             device=x.device)
        centre.index_add_(1, w.regions, x * weights[None, :, None])             # (T', R, C)
        deviation = x - centre[:, w.regions]                                    # (T', M, C)
        n = deviation.shape[0]
        mean = deviation.mean(0)                                                # (M, C)
        m2 = ((deviation - mean) ** 2).sum(0)
        if self.mean is None:
            self.frames, self.mean, self.m2 = n, mean, m2
            return
        total_frames = self.frames + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total_frames)
        self.m2 = self.m2 + m2 + delta**2 * (self.frames * n / total_frames)
        self.frames = total_frames

    def result(self) -> np.ndarray:
        """The dispersion of every region, ``(R, C)`` float64 (see :func:`within_region_dispersion`)."""
        w = self.weights
        n_regions = w.n_regions
        if self.mean is None or self.frames < 2:
            channels = 0 if self.mean is None else self.mean.shape[1]
            return np.full((n_regions, channels), np.nan)
        variance = self.m2 / self.frames                                        # (M, C)
        weights = self.pair_weights
        spread = torch.zeros(n_regions, variance.shape[1], dtype=torch.float64,
                             device=variance.device)
        spread.index_add_(0, w.regions, variance * weights[:, None])            # (R, C)
        squares = torch.zeros(n_regions, dtype=torch.float64, device=weights.device)
        squares.index_add_(0, w.regions, weights**2)
        spread, squares = spread.cpu().numpy(), squares.cpu().numpy()
        # Valid tokens may leave a region fewer effective tokens than the weights allowed.
        enough = (squares > 0) & (1 / np.where(squares > 0, squares, 1) >= MIN_EFFECTIVE_TOKENS
                                  - 1e-9)
        with np.errstate(divide="ignore"):
            return np.where(enough[:, None] & (spread > 0), np.log(spread), np.nan)


def within_region_dispersion(tokens: torch.Tensor, valid: torch.Tensor,
                             weights: RegionPooling) -> np.ndarray:
    """Log of how far a region's tokens move apart over frames, per region and channel.

    With ``x_j(t, c)`` the features of token ``j`` (channel ``c``, frame ``t``) and ``v_rj`` the
    weights of :func:`dispersion_weights`, ``m_r(t, c) = sum_j v_rj x_j(t, c)`` is the region's
    weighted mean token and::

        dispersion[r, c] = log sum_j v_rj Var_t(x_j(t, c) - m_r(t, c))

    the variance taken over all frames of the run. A region whose tokens follow one course
    (whatever its amplitude, and whatever each token's constant offset) has a small dispersion;
    parts of a region that follow different courses raise it, while the region's mean, over
    tokens or voxels, may not change at all. It is the variance of the tokens about their mean
    (``sum_j v_rj Var(x_j) - Var(m_r)``): structure inside regions, which region means average
    away.

    Cost: ``O(F M C)`` time and ``O(M C)`` memory for ``F`` frames, ``C`` channels and ``M``
    weighted (region, token) pairs: for AAL3 at ``tiny`` 1,687 pairs in 77 regions (the other
    89 regions are NaN), 0.01 s for a 40-frame run in four windows on one thread, against 0.2 s
    for the encoder's passes (``benchmarks/subregional.py``).

    Parameters
    ----------
    tokens : torch.Tensor, shape (F, gd, gh, gw, C)
        Token features of every frame of a run (several windows: :class:`DispersionSums`).
    valid : torch.BoolTensor, shape (gd, gh, gw)
    weights : RegionPooling
        From :func:`dispersion_weights`.

    Returns
    -------
    ndarray, shape (R, C), float64
        NaN for a region without enough effective tokens, or with tokens that never vary.
    """
    sums = DispersionSums(weights)
    sums.add(tokens, valid)
    return sums.result()


def input_token_signals(run: CachedRun, token_cells: int) -> torch.Tensor:
    """The model's input averaged over each token: the model-free counterpart of token features.

    :func:`within_region_dispersion` of these one-channel "features" is what the statistic finds
    without a model (the ``subregion`` readout's baseline, as ``fc`` is ``connectivity``'s).

    Parameters
    ----------
    run : CachedRun
        The preprocessed run (all stored frames, the leftovers after the last window included).
    token_cells : int
        Token edge in stored cells (the preset's ``patch_size`` when the cache is stored at its
        downsampling, as the participant level stores it).

    Returns
    -------
    torch.Tensor, shape (n_frames, gd, gh, gw, 1), float64
        The mean z-scored value of each token's cells (background cells count as 0, as the model
        sees them).
    """
    e = token_cells
    if any(size % e for size in run.shape):
        raise ValueError(f"a grid {run.shape} does not tile into {e}-cell tokens")
    tokens = tuple(size // e for size in run.shape)
    support = run.support_index   # read from the entry
    # Support cell -> its token; cells outside the support hold 0 and add nothing to the sums.
    token = np.ravel_multi_index([axis // e for axis in np.unravel_index(support, run.shape)],
                                 tokens)
    matrix = sparse.csr_matrix((np.full(len(support), 1.0 / e**3), (np.arange(len(support)), token)),
                               shape=(len(support), math.prod(tokens)))  # (n_support, G)
    return torch.from_numpy(_stored_frames_times(run, matrix).reshape(run.n_frames, *tokens, 1))


def _stored_frames_times(run: CachedRun, matrix: sparse.csr_matrix) -> np.ndarray:
    """Every stored frame of ``run`` (its support cells) times ``matrix (n_support, K)``.

    Read in chunks of frames, in float64: ``(n_frames, K)``.
    """
    out = np.zeros((run.n_frames, matrix.shape[1]))
    for start in range(0, run.n_frames, _CHUNK_FRAMES):
        chunk = np.asarray(run.data[start:start + _CHUNK_FRAMES], dtype=np.float64)
        out[start:start + len(chunk)] = (matrix.T @ chunk.T).T
    return out


def region_embedding(features: np.ndarray) -> np.ndarray:
    """Mean region features over frames.

    Parameters
    ----------
    features : ndarray, shape (F, R, C)

    Returns
    -------
    ndarray, shape (R, C)
    """
    return features.mean(axis=0)


def feature_correlation(features: np.ndarray) -> np.ndarray:
    """Region-by-region correlation of region features over frames, averaged over channels.

    ``corr[r, s] = mean over channels c of pearson(features[:, r, c], features[:, s, c])``, the
    mean taken over the channels that vary in both regions.

    Parameters
    ----------
    features : ndarray, shape (F, R, C)

    Returns
    -------
    ndarray, shape (R, R)
        Symmetric, 1 on the diagonal of regions with a varying channel, NaN for pairs without
        one (e.g. a region without features).
    """
    x = features.astype(np.float64)
    x = x - x.mean(axis=0)
    sd = np.sqrt((x**2).mean(axis=0))  # (R, C)
    varies = np.isfinite(sd) & (sd > 1e-12 * np.nanmax(sd, initial=0.0))
    z = np.where(varies, x / np.where(varies, sd, 1.0), 0.0)  # (F, R, C)
    products = np.einsum("frc,fsc->rs", z, z) / len(x)  # sum over frames and channels
    pairs = varies.astype(np.float64) @ varies.T.astype(np.float64)  # (R, R) shared channels
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(pairs > 0, products / pairs, np.nan)
    return np.clip(corr, -1.0, 1.0)


def region_timeseries(run: CachedRun, cube: CubeAtlas) -> np.ndarray:
    """Mean signal of every region over the run's brain, frame by frame.

    At downsample 1 (the 2 mm cube), the mean over the region's voxels in the run's brain mask.
    In a cache stored at downsample s, each cell holds the mean of its s^3 voxels, background 0;
    a region's signal is then the mean of the brain-voxel means of the cells with brain
    (``value * s^3 / brain voxels``), weighted by the number of the region's voxels (atlas on the
    cube) each cell holds: :class:`RegionPooling`'s partial-volume weights, renormalised over
    the cells with brain. At s = 1 both are the same.

    Parameters
    ----------
    run : CachedRun
        The preprocessed run (all stored frames, the leftovers after the last window included).
    cube : CubeAtlas
        The atlas on the model cube.

    Returns
    -------
    ndarray, shape (n_frames, R), float64
        NaN for a region without a voxel in a cell holding brain.
    """
    s = run.downsample
    pooling = RegionPooling.from_atlas(cube, s)
    # Support cells -> data columns (-1: a cell without brain).
    support = run.support_index   # read from the entry
    column = np.full(math.prod(run.shape), -1, dtype=np.int64)
    column[support] = np.arange(len(support))
    regions, cells = pooling.regions.numpy(), pooling.tokens.numpy()
    columns = column[cells]
    keep = columns >= 0
    weights = pooling.weights.numpy()[keep]
    regions, cells, columns = regions[keep], cells[keep], columns[keep]
    totals = np.bincount(regions, weights=weights, minlength=cube.n_regions)  # (R,)
    # Brain-voxel mean of a cell = stored value * s^3 / its brain voxels.
    scale = s**3 / run.cell_voxels().ravel()[cells] if s > 1 else np.ones(len(cells))
    matrix = sparse.csr_matrix((weights * scale / totals[regions], (columns, regions)),
                               shape=(len(support), cube.n_regions))  # (n_support, R)
    return np.where(totals > 0, _stored_frames_times(run, matrix), np.nan)


def correlation_matrix(timeseries: np.ndarray) -> np.ndarray:
    """Pearson correlation of region time series with nilearn's ConnectivityMeasure.

    Parameters
    ----------
    timeseries : ndarray, shape (n_frames, R)
        NaN columns (regions without voxels) and constant columns are left out of the estimate
        and get NaN rows and columns.

    Returns
    -------
    ndarray, shape (R, R)
    """
    n_regions = timeseries.shape[1]
    finite = np.isfinite(timeseries).all(axis=0)
    keep = finite & (np.nanstd(np.where(finite, timeseries, 0.0), axis=0) > 0)
    corr = np.full((n_regions, n_regions), np.nan)
    if keep.sum() < 2 or len(timeseries) < 3:
        return corr
    measure = ConnectivityMeasure(kind="correlation", cov_estimator=EmpiricalCovariance())
    corr[np.ix_(keep, keep)] = measure.fit_transform([timeseries[:, keep]])[0]
    return corr


def vectorize(matrix: np.ndarray) -> np.ndarray:
    """Fisher z of the upper triangle (diagonal excluded) of a correlation matrix, row by row.

    Parameters
    ----------
    matrix : ndarray, shape (R, R)

    Returns
    -------
    ndarray, shape (R * (R - 1) / 2,)
        NaN where the correlation is NaN.
    """
    rows, cols = np.triu_indices(matrix.shape[0], k=1)
    values = np.clip(matrix[rows, cols], -1 + 1e-7, 1 - 1e-7)
    return np.arctanh(values)


def edge_regions(n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """The two regions of each entry of :func:`vectorize`'s output, in its order."""
    return np.triu_indices(n_regions, k=1)
