"""The masked autoencoder interface that both backbones implement (as facebookresearch/mae).

Hidden voxels are zeroed in the input, which also carries a hidden-voxel indicator channel. The
backbones share the pooling to working resolution, the loss (mean squared error over hidden brain
voxels) and the outputs; each implements :meth:`MaskedAutoencoder._reconstruct`,
:meth:`~MaskedAutoencoder._embed` and :meth:`~MaskedAutoencoder._embed_tokens`:

- ``swin4d`` (:class:`bidsapp.model.swin4d.SwinMaskedAutoencoder`, the default and the reference):
  SimMIM, every token of the cube is encoded, hidden ones as a learned mask token;
- ``vit4d`` (:class:`bidsapp.model.vit4d.ViTMaskedAutoencoder`): MAE, the encoder sees only the
  visible brain tokens and a transformer decoder fills in mask tokens.

Build one with :func:`bidsapp.model.factory.build_model`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from bidsapp.grid import CUBE_SHAPE
from bidsapp.model.layers import blocks, depth_to_space
from bidsapp.model.masking import Mask
from bidsapp.model.presets import ModelPreset


@dataclass
class MAEOutput:
    """Result of one training forward pass.

    Attributes
    ----------
    pred : torch.Tensor, shape (B, T, D, H, W)
        Reconstruction at working resolution (0 on tokens without brain, except for the plain
        swin4d path).
    target : torch.Tensor, shape (B, T, D, H, W)
        What ``pred`` is compared with: the pooled input, normalised per token and frame when
        ``norm_pix_loss`` is on.
    weight : torch.Tensor, shape (B, T, D, H, W)
        1.0 on hidden brain voxels (the loss set), 0.0 elsewhere (a view, expanded over frames).
    embedding : torch.Tensor, shape (B, C)
        The window embedding of the masked input (as :meth:`MaskedAutoencoder.encode`), so that
        attribution gets reconstruction and embedding from one encoder pass.
    """

    pred: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    embedding: torch.Tensor

    @cached_property
    def loss(self) -> torch.Tensor:
        """Scalar: mean squared error over hidden brain voxels.

        Computed when first asked for, so that inference, which never asks, does not pay for it.
        """
        return masked_mse(self.pred, self.target, self.weight)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``(pred - target)**2``; zero when the weights are all zero.

    Only the entries of nonzero weight are read (the hidden brain is a small part of the cube),
    which also makes the backward pass a scatter instead of several passes over the cube.
    """
    index = (weight != 0).flatten().nonzero().squeeze(1)  # (M,) into the row-major order
    w = torch.take(weight, index)
    return ((torch.take(pred, index) - torch.take(target, index)) ** 2 * w).sum() / w.sum().clamp_min(1.0)


def normalize_patches(
    x: torch.Tensor, brain: torch.Tensor, patch_size: int, eps: float = 1e-6
) -> torch.Tensor:
    """Standardise every token of every frame over its brain voxels (MAE's ``norm_pix_loss``).

    Parameters
    ----------
    x : torch.Tensor, shape (B, T, D, H, W)
    brain : torch.BoolTensor, shape (B, D, H, W)
    patch_size : int

    Returns
    -------
    torch.Tensor, shape (B, T, D, H, W)
        Background voxels are standardised with their token's brain statistics; they carry no
        loss.
    """
    patches = blocks(x, patch_size)  # (B, T, gd, gh, gw, p^3)
    w = blocks(brain[:, None].to(x.dtype), patch_size)  # (B, 1, gd, gh, gw, p^3)
    count = w.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (patches * w).sum(-1, keepdim=True) / count
    var = ((patches - mean) ** 2 * w).sum(-1, keepdim=True) / count
    return depth_to_space((patches - mean) / (var + eps).sqrt(), patch_size).squeeze(-1)


class MaskedAutoencoder(nn.Module, ABC):
    """Masked autoencoder on 4D fMRI windows: the part both backbones share.

    Parameters
    ----------
    preset : ModelPreset
        Backbone and sizes (see :mod:`bidsapp.model.presets`).
    norm_pix_loss : bool
        Reconstruct every token of every frame standardised over its brain voxels.
    """

    #: Whether :meth:`forward` reconstructs hidden voxels (an encoder-only network cannot: it
    #: embeds, and attribution measures occlusion alone; :attr:`no_decoder_reason` says why).
    has_decoder: bool = True
    no_decoder_reason: str | None = None

    def __init__(self, preset: ModelPreset, *, norm_pix_loss: bool = False):
        super().__init__()
        self.preset = preset
        self.norm_pix_loss = norm_pix_loss

    def prepare(self, x: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool to working resolution, unless the input is already there.

        Parameters
        ----------
        x : torch.Tensor, shape (B, T, 96, 96, 96) or (B, T, D, H, W)
            The cube, or input already at the working shape (a cache stored at the preset's
            ``downsample``: :mod:`bidsapp.preprocess`), returned as it is.
        brain : torch.BoolTensor, shape (B, *x.shape[2:])

        Returns
        -------
        x : torch.Tensor, shape (B, T, D, H, W)
            Average-pooled values.
        brain : torch.BoolTensor, shape (B, D, H, W)
            Voxels at least half brain.
        """
        working = self.preset.working_shape()
        if x.ndim != 5 or tuple(x.shape[2:]) not in (CUBE_SHAPE, working):
            raise ValueError(f"x must be (B, T, 96, 96, 96) or at the working shape (B, T, "
                             f"{', '.join(map(str, working))}); got {tuple(x.shape)}")
        if brain.shape != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"brain must be (B, {', '.join(map(str, x.shape[2:]))}) as x; got "
                             f"{tuple(brain.shape)}")
        s = self.preset.downsample
        if s == 1 or tuple(x.shape[2:]) == working:
            return x, brain.bool()
        x = F.avg_pool3d(x, s)  # (B, T, ...) read as (N, C, D, H, W): pools each frame
        brain = F.avg_pool3d(brain[:, None].to(x.dtype), s)[:, 0] >= 0.5
        return x, brain

    @staticmethod
    def hidden_voxels(x: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """The hidden voxels of working-resolution ``x (B, T, D, H, W)``, as a bool view of its shape."""
        if mask is None:
            return torch.zeros(1, dtype=torch.bool, device=x.device).expand(x.shape)
        b, t, *working = x.shape
        if mask.voxels.shape not in ((b, 1, *working), (b, t, *working)):
            raise ValueError(
                f"mask voxels {tuple(mask.voxels.shape)} do not fit the working-resolution "
                f"input {tuple(x.shape)}: expected (B, 1 or T, D, H, W)"
            )
        return mask.voxels.expand_as(x)  # Tm = 1 broadcasts

    def forward(self, x: torch.Tensor, brain: torch.Tensor, mask: Mask) -> MAEOutput:
        """Reconstruct the hidden voxels.

        Parameters
        ----------
        x : torch.Tensor, shape (B, T, 96, 96, 96) or at the working shape (:meth:`prepare`)
        brain : torch.BoolTensor, shape (B, 96, 96, 96) or at the working shape
        mask : Mask
            At this model's working resolution, ``Tm`` = 1 or ``T``.
        """
        x, brain = self.prepare(x, brain)  # (B, T, D, H, W), (B, D, H, W)
        pred, embedding = self._reconstruct(x, brain, mask)  # (B, T, D, H, W), (B, C)
        weight = (mask.voxels & brain[:, None]).to(x.dtype).expand_as(x)  # (B, T, D, H, W)
        target = normalize_patches(x, brain, self.preset.patch_size) if self.norm_pix_loss else x
        return MAEOutput(pred, target, weight, embedding)

    def encode(
        self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None = None
    ) -> torch.Tensor:
        """Embed each window: ``(B, C)``, each sample independently of the others in the batch.

        Parameters
        ----------
        x : torch.Tensor, shape (B, T, 96, 96, 96) or at the working shape (:meth:`prepare`)
        brain : torch.BoolTensor, shape (B, 96, 96, 96) or at the working shape
        mask : Mask, optional
            Hide part of the input (attribution); nothing is hidden by default.
        """
        x, brain = self.prepare(x, brain)
        return self._embed(x, brain, mask)

    def encode_tokens(
        self, x: torch.Tensor, brain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed each window and keep its finest token features (nothing hidden).

        The global embedding averages away what differs between regions and frames; the token
        features of the finest stage keep it, for region readouts (:mod:`bidsapp.readouts`).

        Parameters
        ----------
        x : torch.Tensor, shape (B, T, 96, 96, 96) or at the working shape (:meth:`prepare`)
        brain : torch.BoolTensor, shape (B, 96, 96, 96) or at the working shape

        Returns
        -------
        embedding : torch.Tensor, shape (B, C)
            As :meth:`encode`, from the same pass.
        tokens : torch.Tensor, shape (B, T', gd, gh, gw, C0)
            Features on the token grid; ``T' = T / tubelet`` steps.
        valid : torch.BoolTensor, shape (B, gd, gh, gw)
            Tokens that carry features (every token for swin4d; brain tokens for vit4d).
        """
        x, brain = self.prepare(x, brain)
        return self._embed_tokens(x, brain)

    @abstractmethod
    def _reconstruct(
        self, x: torch.Tensor, brain: torch.Tensor, mask: Mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Working-resolution ``x (B, T, D, H, W)``, ``brain (B, D, H, W)`` -> pred, embedding."""

    @abstractmethod
    def _embed(self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """Working-resolution ``x (B, T, D, H, W)``, ``brain (B, D, H, W)`` -> ``(B, C)``."""

    @abstractmethod
    def _embed_tokens(
        self, x: torch.Tensor, brain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Working-resolution ``x``, ``brain`` -> embedding, token features, valid tokens."""
