"""Region attribution: the masked passes of a window and their running sums.

Regions are hidden in random halves (:func:`subsets`), each window passed once per subset
(:class:`RegionPasses`); :class:`AttributionSums` turns the passes into each region's
reconstruction error and occlusion effect. :data:`ATTRIBUTION_METHOD` says how, in words (a
constant, not this docstring, so that the participant level writes it into its sidecars under
``python -OO`` too). :func:`bidsapp.inference.analyse_run` drives it window by window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.masking import Mask, RegionTokenOrVoxelMasking, RegionVoxelMasking

#: How attribution works, written into the participant level's sidecars as ``Method``.
ATTRIBUTION_METHOD = """\
Apply a pretrained model to one run: window embeddings and per-region attribution.

Attribution hides AAL3 regions with the masking code used in training (``from_regions``), never one
region per forward pass. Each window is passed ``K`` times (``--attribution-subsets``, even) with a random
half of the regions hidden, each subset paired with its complement, so every region is hidden in exactly
``K/2`` passes and visible in the other ``K/2`` (a balanced RISE-style design). From these passes:

- **reconstruction error** of region r: the mean squared error over r's hidden brain voxels in the passes
  that hid r (lower = better reconstructed from context); its standard error over those passes and windows
  is reported beside it;
- **occlusion effect** of region r on the window embedding: ``delta_r = mean(emb | r hidden) -
  mean(emb | r visible)``, the average change of the embedding when r is hidden in the model's training
  context (half the regions hidden). The occluded embedding of r is ``emb + delta_r`` and the
  **representation sensitivity** is ``|delta_r| / s``, the displacement of the run embedding in units
  of ``s``, the root-mean-square distance of the run's window embeddings from their mean (how far the
  embedding moves when a region is hidden, compared with how far it moves from one window of the same
  run to the next; a cosine is blind to this, since every embedding shares a large common component).
  Each delta mixes in the other regions' effects with mean zero; its precision improves as
  ``1/sqrt(K * windows)``.

Regions are hidden as the model was trained to see them hidden: by their tokens (a ``roi``,
``random`` or ``brain-random`` model) or by their voxels (a ``roi-voxel`` model). A region too small
to own a token of the model grid (52 of AAL3's 166 at ``tiny``) is hidden voxel by voxel in either
case, inside tokens that stay visible (``RegionTokenOrVoxelMasking``): its values are those of a
finer occlusion than the token-owning regions' and are marked so in the region table. Only a region
without a brain voxel on the model's working grid cannot be hidden.

A model without a decoder (an imported SwiFT encoder) gets the occlusion effect alone: its passes
embed the masked input, and its reconstruction errors are n/a (the run's sidecar says why).

Cost: ``K + 1`` encoder passes per window instead of ``R + 1`` (166 + 1 for AAL3). The unmasked pass
also gives the region readouts (:mod:`bidsapp.readouts`).
"""



def subsets(eligible: torch.Tensor, n_subsets: int, generator: torch.Generator) -> torch.Tensor:
    """``(K, 1, R)`` bool: K/2 random halves of the eligible regions, each with its complement."""
    n_pairs = n_subsets // 2
    idx = eligible.nonzero().flatten()
    half = torch.zeros(n_pairs, eligible.numel(), dtype=torch.bool, device=eligible.device)
    for k in range(n_pairs):
        perm = idx[torch.randperm(idx.numel(), generator=generator, device=eligible.device)]
        half[k, perm[: idx.numel() // 2]] = True
    pairs = torch.cat([half, (~half) & eligible], dim=0)
    return pairs[:, None, :]


def _region_errors(pred: torch.Tensor, target: torch.Tensor, mask: Mask, labelled: torch.Tensor,
                   labelled_regions: torch.Tensor, n_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared reconstruction error summed over each region's hidden voxels, and their count.

    Parameters
    ----------
    pred, target : torch.Tensor, shape (k, T, D, H, W)
    mask : Mask
        Hiding whole tubes (``Tm`` = 1), as region subsets do.
    labelled : torch.LongTensor, shape (V,)
        Flat indices of the brain voxels that belong to a region.
    labelled_regions : torch.LongTensor, shape (V,)
        Their regions.

    Returns
    -------
    error, hidden : torch.Tensor, shape (k, R)
        Sum of squared errors over hidden (voxel, frame) pairs, and the number of such pairs.
    """
    k, n_frames = pred.shape[:2]
    # Only the hidden labelled voxels are read: about half of a quarter of the cube.
    hidden = mask.voxels[:, 0].flatten(1).index_select(1, labelled)  # (k, V) bool
    error = torch.zeros(k, n_regions, device=pred.device, dtype=pred.dtype)
    count = torch.zeros(k, n_regions, device=pred.device, dtype=pred.dtype)
    for i in range(k):
        where = hidden[i].nonzero().squeeze(1)  # (Vh,) among the labelled voxels
        voxels, regions = labelled[where], labelled_regions[where]
        diff = pred[i].flatten(1).index_select(1, voxels) - target[i].flatten(1).index_select(1, voxels)
        error[i].index_add_(0, regions, (diff * diff).sum(0))  # (T, Vh) -> (Vh,) -> (R,)
        count[i].index_add_(0, regions, torch.full_like(regions, n_frames, dtype=pred.dtype))
    return error, count


class RegionPasses:
    """The masked forward passes of one window, each hiding a subset of regions.

    Parameters
    ----------
    model : MaskedAutoencoder
        The pretrained model.
    masking : RegionTokenOrVoxelMasking or RegionVoxelMasking
        Hides whole regions (:meth:`from_regions`).
    batch_size : int
        Passes run at once.
    """

    def __init__(self, model: MaskedAutoencoder,
                 masking: RegionTokenOrVoxelMasking | RegionVoxelMasking,
                 batch_size: int) -> None:
        self.model, self.masking, self.batch_size = model, masking, batch_size
        grid = masking.grid
        self.n_regions = grid.n_regions
        # Reconstruction errors are read at the labelled brain voxels only (a quarter of the cube).
        self.labelled = (grid.brain & (grid.voxel_labels >= 0)).flatten().nonzero().squeeze(1)  # (V,)
        self.labelled_regions = grid.voxel_labels.flatten()[self.labelled]                     # (V,)

    def __call__(self, x: torch.Tensor, brain: torch.Tensor, regions: torch.Tensor, *,
                 example: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 dict[str, np.ndarray]]:
        """Run the passes of ``regions`` on one window.

        Parameters
        ----------
        x : torch.Tensor, shape (1, T, D, H, W)
            The window.
        brain : torch.Tensor, shape (1, D, H, W)
            Its brain mask.
        regions : torch.BoolTensor, shape (K, 1, R)
            The regions each pass hides (:func:`subsets`).
        example : bool
            Also return the middle frame of the first pass (for the report); else ``{}``.

        Returns
        -------
        embeddings : torch.Tensor, shape (K, C)
        errors, counts : torch.Tensor, shape (K, R)
            :func:`_region_errors` of each pass (zero for a model without a decoder, whose
            passes only embed).
        shown : dict of numpy.ndarray
            ``input``, ``hidden`` and ``reconstruction`` slices, or empty.
        """
        embs, errs, counts = [], [], []
        shown: dict[str, np.ndarray] = {}
        for start in range(0, regions.shape[0], self.batch_size):
            chunk = regions[start:start + self.batch_size]
            k = chunk.shape[0]
            mask = self.masking.from_regions(chunk)
            xs, brains = x.expand(k, -1, -1, -1, -1), brain.expand(k, -1, -1, -1)
            if not self.model.has_decoder:   # occlusion alone: no error is counted
                embs.append(self.model.encode(xs, brains, mask))
                errs.append(torch.zeros(k, self.n_regions, device=x.device, dtype=x.dtype))
                counts.append(torch.zeros(k, self.n_regions, device=x.device, dtype=x.dtype))
                continue
            out = self.model(xs, brains, mask)
            embs.append(out.embedding)                                  # (k, C)
            error, hidden = _region_errors(out.pred, out.target, mask, self.labelled,
                                           self.labelled_regions, self.n_regions)  # (k, R) each
            errs.append(error)
            counts.append(hidden)
            if example and start == 0:
                t = x.shape[1] // 2
                mid = out.target.shape[2] // 2
                shown = {
                    "input": out.target[0, t, :, :, mid].float().cpu().numpy(),
                    "hidden": mask.voxels[0, 0, :, :, mid].cpu().numpy(),
                    "reconstruction": out.pred[0, t, :, :, mid].float().cpu().numpy(),
                }
        return torch.cat(embs), torch.cat(errs), torch.cat(counts), shown


@dataclass(frozen=True)
class RegionAttribution:
    """The per-region results of :class:`AttributionSums` (R regions, C embedding dims)."""

    recon_error: np.ndarray           # (R,) NaN where a region was never hidden
    recon_error_se: np.ndarray        # (R,) NaN where it was hidden in fewer than two passes
    occluded_embeddings: np.ndarray   # (R, C) NaN rows for regions that cannot be hidden
    occlusion: np.ndarray             # (R,)


class AttributionSums:
    """Running sums of a run's attribution passes, added window by window.

    Per window, the embedding delta of each region (mean embedding with the region hidden minus
    visible); per region, the sum, sum of squares and count of its per-pass reconstruction errors.
    The sums, not the passes, are kept: memory does not grow with the run's length.
    """

    def __init__(self) -> None:
        self.deltas: list[torch.Tensor] = []   # one (R, C) per window
        self.err_sum: torch.Tensor | None = None
        self.err_sq: torch.Tensor | None = None
        self.err_n: torch.Tensor | None = None

    def add(self, regions: torch.Tensor, embeddings: torch.Tensor, errors: torch.Tensor,
            counts: torch.Tensor) -> None:
        """Add the passes of one window.

        Parameters
        ----------
        regions : torch.BoolTensor, shape (K, 1, R)
            The regions each pass hid.
        embeddings : torch.Tensor, shape (K, C)
        errors, counts : torch.Tensor, shape (K, R)
            Summed squared error over each region's hidden voxels, and their number.
        """
        hidden_r = regions[:, 0, :].to(embeddings.dtype)                # (K, R)
        n_hidden = hidden_r.sum(0).clamp_min(1)                         # (R,)
        n_visible = (1 - hidden_r).sum(0).clamp_min(1)
        mean_hidden = hidden_r.T @ embeddings / n_hidden[:, None]       # (R, C)
        mean_visible = (1 - hidden_r).T @ embeddings / n_visible[:, None]
        self.deltas.append(mean_hidden - mean_visible)
        # Per pass and region: mean squared error over the region's hidden voxels.
        e = errors / counts.clamp_min(1)                                # (K, R)
        # Only passes that drew the region count: a neighbour's hidden token can also hide some
        # of its voxels.
        present = (counts > 0) & regions[:, 0, :]
        e = torch.where(present, e, torch.zeros_like(e))
        n = present.sum(0).to(e.dtype)
        # Started from the first window's sums, not zeros: the same floating-point additions.
        first = self.err_sum is None
        self.err_sum = e.sum(0) if first else self.err_sum + e.sum(0)
        self.err_sq = (e**2).sum(0) if first else self.err_sq + (e**2).sum(0)
        self.err_n = n if first else self.err_n + n

    def result(self, window_embeddings: np.ndarray, eligible: np.ndarray) -> RegionAttribution:
        """Reconstruction errors and occlusion effects of every region.

        Parameters
        ----------
        window_embeddings : numpy.ndarray, shape (W, C)
            The unmasked embeddings of the run's windows.
        eligible : numpy.ndarray of bool, shape (R,)
            The regions that can be hidden at the model's grid.
        """
        n = self.err_n.clamp_min(1)
        mean = self.err_sum / n
        var = (self.err_sq / n - mean**2).clamp_min(0) * n / (n - 1).clamp_min(1)
        recon_error = torch.where(self.err_n > 0, mean, torch.nan).cpu().numpy()
        recon_error_se = torch.where(self.err_n > 1, (var / n).sqrt(), torch.nan).cpu().numpy()
        delta = torch.stack(self.deltas).mean(0).float().cpu().numpy()  # (R, C)
        occluded = window_embeddings.mean(0)[None, :] + delta
        spread = window_spread(window_embeddings)
        with np.errstate(invalid="ignore", divide="ignore"):
            sensitivity = np.linalg.norm(delta, axis=1) / spread
        return RegionAttribution(recon_error, recon_error_se,
                                 np.where(eligible[:, None], occluded, np.nan),
                                 np.where(eligible & (spread > 0), sensitivity, np.nan))



def window_spread(window_embeddings: np.ndarray) -> float:
    """Root-mean-square distance of window embeddings ``(W, C)`` from their mean (0 for one window)."""
    centred = window_embeddings - window_embeddings.mean(0)
    return float(np.sqrt((centred**2).sum(1).mean()))
