"""The masked autoencoder: a backbone, a mask token and a light decoder (``preset.backbone``).

Hidden voxels are zeroed in the input, which also carries a hidden-voxel indicator channel. Two
backbones share the masking, the loss (mean squared error over hidden brain voxels) and the
outputs:

- ``swin4d`` (:class:`SwinMaskedAutoencoder`, the default and the reference): tokens the mask marks
  as hidden are replaced by a learned mask token after the patch embedding (SimMIM, as
  NeuroSTORM) and every token of the cube is encoded; the decoder undoes the patch merging with
  linear "pixel-shuffle" upsampling from the last stage and maps every token to its ``p^3`` voxels.
- ``vit4d`` (:class:`bidsapp.model.vit4d.ViTMaskedAutoencoder`): as facebookresearch/mae, the
  encoder sees only the visible brain tokens and a transformer decoder fills in mask tokens.

Background skipping in swin4d. A token whose input is exactly 0 and that is not hidden embeds to
the patch embedding's bias, so the embedding is computed only for the other tokens; the decoder
head runs only on tokens that hold brain (``pred`` is 0 elsewhere, where the loss has no weight).
Both are exact. Skipping attention windows is not: a window without brain is a function of its
positions only if its input is 0 and unmasked and, from the shifted block on, if its tokens never
shared a window with brain, so its output could only be reused from a pass over an empty input
with the current weights (again at every training step). With 48 mm windows on the AAL3 brain,
only 14% of the first stage-0 windows (and none of later stages) hold no brain token: that pass
and the gathering would cost more than they save.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bidsapp.model.masking import Mask
from bidsapp.model.presets import INPUT_SHAPE, ModelPreset
from bidsapp.model.swin4d import PatchEmbed4D, Swin4DEncoder, depth_to_space, space_to_depth


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
        """Scalar: mean squared error over hidden brain voxels (computed when first asked for, so
        that inference, which never asks, does not pay for it)."""
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
    patches = space_to_depth(x.unsqueeze(-1), patch_size)  # (B, T, gd, gh, gw, p^3)
    w = space_to_depth(brain[:, None, ..., None].to(x.dtype), patch_size)  # (B, 1, g.., p^3)
    count = w.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (patches * w).sum(-1, keepdim=True) / count
    var = ((patches - mean) ** 2 * w).sum(-1, keepdim=True) / count
    return depth_to_space((patches - mean) / (var + eps).sqrt(), patch_size).squeeze(-1)


def brain_tokens(brain: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Tokens holding at least one brain voxel: ``(B, D, H, W) -> (B, D/p, H/p, W/p)`` bool."""
    return space_to_depth(brain[..., None], patch_size).any(-1)


class MaskedAutoencoder(nn.Module):
    """Masked autoencoder on 4D fMRI windows.

    ``MaskedAutoencoder(preset)`` builds the subclass of the backbone that ``preset.backbone``
    names; the subclasses implement :meth:`_reconstruct` and :meth:`_embed`.

    Parameters
    ----------
    preset : ModelPreset
        Backbone and sizes (see :mod:`bidsapp.model.presets`).
    norm_pix_loss : bool
        Reconstruct every token of every frame standardised over its brain voxels.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> MaskedAutoencoder:
        if cls is MaskedAutoencoder:
            # Imported here: vit4d imports this module.
            from bidsapp.model.vit4d import ViTMaskedAutoencoder

            preset = args[0] if args else kwargs["preset"]
            cls = {"swin4d": SwinMaskedAutoencoder, "vit4d": ViTMaskedAutoencoder}[preset.backbone]
        return super().__new__(cls)

    def __init__(self, preset: ModelPreset, *, norm_pix_loss: bool = False):
        super().__init__()
        self.preset = preset
        self.norm_pix_loss = norm_pix_loss

    def prepare(self, x: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool to working resolution.

        Parameters
        ----------
        x : torch.Tensor, shape (B, T, 96, 96, 96)
        brain : torch.BoolTensor, shape (B, 96, 96, 96)

        Returns
        -------
        x : torch.Tensor, shape (B, T, D, H, W)
            Average-pooled values.
        brain : torch.BoolTensor, shape (B, D, H, W)
            Voxels at least half brain.
        """
        if x.ndim != 5 or tuple(x.shape[2:]) != INPUT_SHAPE:
            raise ValueError(f"x must be (B, T, 96, 96, 96); got {tuple(x.shape)}")
        if brain.shape != (x.shape[0], *INPUT_SHAPE):
            raise ValueError(f"brain must be (B, 96, 96, 96); got {tuple(brain.shape)}")
        s = self.preset.downsample
        if s == 1:
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
        x : torch.Tensor, shape (B, T, 96, 96, 96)
        brain : torch.BoolTensor, shape (B, 96, 96, 96)
        mask : Mask
            At this model's working resolution, ``Tm`` = 1 or ``T``.
        """
        x, brain = self.prepare(x, brain)
        pred, embedding = self._reconstruct(x, brain, mask)  # (B, T, D, H, W), (B, C)
        weight = (mask.voxels & brain[:, None]).to(x.dtype).expand_as(x)
        target = normalize_patches(x, brain, self.preset.patch_size) if self.norm_pix_loss else x
        return MAEOutput(pred, target, weight, embedding)

    def encode(
        self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None = None
    ) -> torch.Tensor:
        """Embed each window: ``(B, C)``, each sample independently of the others in the batch.

        Parameters
        ----------
        x : torch.Tensor, shape (B, T, 96, 96, 96)
        brain : torch.BoolTensor, shape (B, 96, 96, 96)
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
        x : torch.Tensor, shape (B, T, 96, 96, 96)
        brain : torch.BoolTensor, shape (B, 96, 96, 96)

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

    def _embed_tokens(
        self, x: torch.Tensor, brain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Working-resolution ``x``, ``brain`` -> embedding, token features, valid tokens."""
        raise NotImplementedError

    def _reconstruct(
        self, x: torch.Tensor, brain: torch.Tensor, mask: Mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Working-resolution ``x (B, T, D, H, W)``, ``brain (B, D, H, W)`` -> pred, embedding."""
        raise NotImplementedError

    def _embed(self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """Working-resolution ``x (B, T, D, H, W)``, ``brain (B, D, H, W)`` -> ``(B, C)``."""
        raise NotImplementedError


class _Decoder(nn.Module):
    """From the last stage back to voxels: ``(B, T, g_L.., C_L) -> (B, T, D, H, W)``."""

    def __init__(self, dims: tuple[int, ...], patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        # Stage i -> i-1: 8*C_{i-1} channels, shuffled onto the 2x2x2 finer grid.
        self.ups = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dims[i]), nn.Linear(dims[i], 8 * dims[i - 1]))
            for i in range(len(dims) - 1, 0, -1)
        )
        self.head = nn.Sequential(nn.LayerNorm(dims[0]), nn.Linear(dims[0], patch_size**3))

    def forward(self, z: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``z``; with ``keep (B, gd, gh, gw)``, only those tokens (the others give 0)."""
        for up in self.ups:
            z = depth_to_space(up(z), 2)  # (B, T, g.., C) at last the stage-0 grid
        if keep is None:
            return depth_to_space(self.head(z), self.patch_size).squeeze(-1)
        keep = keep[:, None].expand(z.shape[:-1])  # (B, T, gd, gh, gw)
        voxels = z.new_zeros(*keep.shape, self.patch_size**3)
        voxels[keep] = self.head(z[keep])  # (M, p^3)
        return depth_to_space(voxels, self.patch_size).squeeze(-1)


class SwinMaskedAutoencoder(MaskedAutoencoder):
    """swin4d: the mask token replaces hidden tokens before the Swin4D encoder (SimMIM).

    ``skip_background`` (on by default; off = the plain path, for tests) embeds only tokens with a
    nonzero or hidden voxel and decodes only tokens holding brain (see the module docstring).
    """

    skip_background: bool = True

    def __init__(self, preset: ModelPreset, *, norm_pix_loss: bool = False):
        super().__init__(preset, norm_pix_loss=norm_pix_loss)
        dims = preset.stage_dims()
        # Two input channels per voxel: the visible value (0 if hidden) and the hidden indicator.
        self.patch_embed = PatchEmbed4D(preset.patch_size, 2, preset.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(preset.embed_dim))
        self.encoder = Swin4DEncoder(
            preset.grid_shape(), preset.embed_dim, preset.depths, preset.num_heads,
            preset.window_size, preset.mlp_ratio,
        )
        self.decoder = _Decoder(dims, preset.patch_size)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _tokens(self, x: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """Patch embedding of ``x (B, T, D, H, W)``: ``(B, T, gd, gh, gw, C0)``."""
        hidden = self.hidden_voxels(x, mask)  # (B, T, D, H, W)
        if not self.skip_background:
            return self.patch_embed(torch.stack([x.masked_fill(hidden, 0.0), hidden.to(x.dtype)], -1))
        p = self.preset.patch_size
        values = space_to_depth(x[..., None], p)  # (B, T, gd, gh, gw, p^3)
        flags = space_to_depth(hidden[..., None], p)  # (B, T, gd, gh, gw, p^3)
        # Tokens with input 0 embed to the bias; hidden tokens get the mask token anyway.
        active = values.ne(0).any(-1) | flags.any(-1)  # (B, T, gd, gh, gw)
        if mask is not None:
            active &= ~mask.tokens
        hid = flags[active]  # (M, p^3)
        # Channels ordered (voxel, [value, indicator]) as in PatchEmbed4D.
        rows = torch.stack([values[active].masked_fill(hid, 0.0), hid.to(x.dtype)], -1)
        out = self.patch_embed.proj(rows.flatten(1))  # (M, C0)
        tokens = self.patch_embed.proj.bias.to(out.dtype).expand(*active.shape, -1).clone()
        tokens[active] = out
        return tokens

    def _features(self, x: torch.Tensor, mask: Mask | None) -> list[torch.Tensor]:
        """Encode working-resolution ``x (B, T, D, H, W)``; stage outputs as the encoder's."""
        tokens = self._tokens(x, mask)  # (B, T, gd, gh, gw, C0)
        if mask is not None:
            tokens = torch.where(mask.tokens[..., None], self.mask_token.to(tokens.dtype), tokens)
        return self.encoder(tokens)

    def _reconstruct(
        self, x: torch.Tensor, brain: torch.Tensor, mask: Mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._features(x, mask)[-1]  # (B, T, g_L.., C_L)
        keep = brain_tokens(brain, self.preset.patch_size) if self.skip_background else None
        return self.decoder(last, keep), self._pool(last, brain)

    def _embed(self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """The mean of the last stage's features over all frames and the tokens that hold brain.

        A stage-L token holds brain if any of its working voxels does.
        """
        return self._pool(self._features(x, mask)[-1], brain)

    def _embed_tokens(
        self, x: torch.Tensor, brain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage-0 features (the finest grid) beside the pooled last stage, from one pass."""
        feats = self._features(x, None)
        first = feats[0]  # (B, T, gd, gh, gw, C0)
        valid = torch.ones(first.shape[0], *first.shape[2:5], dtype=torch.bool, device=x.device)
        return self._pool(feats[-1], brain), first, valid

    def _pool(self, feats: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """Mean of last-stage ``feats (B, T, g_L.., C_L)`` over frames and brain tokens: (B, C_L)."""
        factor = self.preset.patch_size * 2 ** (len(self.preset.depths) - 1)
        keep = brain_tokens(brain, factor)[:, None, ..., None].to(feats.dtype)  # (B, 1, g_L.., 1)
        total = (feats * keep).sum((1, 2, 3, 4))  # (B, C_L)
        count = keep.sum((1, 2, 3, 4)) * feats.shape[1]  # (B, 1)
        return total / count.clamp_min(1.0)


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: truncated-normal linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_parameters(preset: ModelPreset) -> int:
    """Number of trainable parameters of the masked autoencoder of ``preset``."""
    # The meta device gives shapes without allocating or initialising memory.
    with torch.device("meta"):
        model = MaskedAutoencoder(preset)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
