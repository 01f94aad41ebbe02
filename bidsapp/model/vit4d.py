"""A plain 4D vision transformer and its masked autoencoder (backbone ``vit4d``).

As in facebookresearch/mae (``models_mae.py``) and its video version mae_st: a token is a
``p x p x p x tt`` tubelet (``p^3`` working voxels of ``tt`` frames), embedded linearly with the
same two channels per voxel as swin4d (value, 0 if hidden, and hidden indicator), given fixed
sine-cosine positional embeddings (a quarter of the channels per axis t, d, h, w, so any number of
frames works) and passed through pre-norm transformer blocks with global attention
(``scaled_dot_product_attention``). The encoder sees only the visible brain tokens; the light
decoder sees every brain token: the encoded ones and a mask token in place of each hidden one.
Background tokens (no brain voxel) carry no loss: they are neither encoded nor decoded, and their
reconstruction is 0.

A token is hidden when the mask hides it in every frame of its tubelet; tokens with some hidden
voxels (``roi-voxel``, or frames hidden by a ``mask_time="random"`` mask) stay visible with those
voxels zeroed and flagged. Samples keep different numbers of tokens: a batch is padded to the
longest one and padded tokens are never attended to, so each sample's result does not depend on
the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from bidsapp.model.layers import (
    Block,
    brain_tokens,
    depth_to_space,
    init_weights,
    sincos_embedding_4d,
    space_to_depth,
)
from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.masking import Mask
from bidsapp.model.presets import ModelPreset


def patchify(x: torch.Tensor, patch_size: int, tubelet: int) -> torch.Tensor:
    """``(B, T, D, H, W) -> (B, T/tt, D/p, H/p, W/p, p^3*tt)``, voxels ordered (fd, fh, fw, ft)."""
    b, t, d, h, w = x.shape
    x = x.reshape(b, t // tubelet, tubelet, d, h, w).movedim(2, -1)  # (B, T', D, H, W, tt)
    return space_to_depth(x, patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: int, tubelet: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, T', gd, gh, gw, p^3*tt) -> (B, T'*tt, D, H, W)``."""
    x = depth_to_space(tokens, patch_size).movedim(-1, 2)  # (B, T', tt, D, H, W)
    return x.flatten(1, 2)


def pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept tokens of each sample, in order, padded to the longest sample.

    Parameters
    ----------
    keep : torch.BoolTensor, shape (B, N)

    Returns
    -------
    index : torch.LongTensor, shape (B, M)
        ``M`` is the largest kept count; the padding slots point at tokens that are not kept
        (so the indices of a row are distinct).
    valid : torch.BoolTensor, shape (B, M)
        False on the padding slots.
    """
    counts = keep.sum(1)  # (B,)
    m = int(counts.max()) if keep.numel() else 0
    index = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :m]
    return index, torch.arange(m, device=keep.device) < counts[:, None]


class Transformer(nn.Module):
    """Blocks and a final LayerNorm over a padded batch: ``(B, N, C)``, ``valid (B, N)`` -> ``(B, N, C)``."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Encode tokens ``x``, attending to the ``valid`` ones only."""
        # A sample with no valid token attends to its padding, so that no row is all masked (NaN).
        keys = (valid | ~valid.any(1, keepdim=True))[:, None, None, :]  # (B, 1, 1, N)
        for block in self.blocks:
            x = block(x, keys)
        return self.norm(x)


class ViTMaskedAutoencoder(MaskedAutoencoder):
    """vit4d: the encoder sees the visible brain tokens, the decoder every brain token (MAE)."""

    def __init__(self, preset: ModelPreset, *, norm_pix_loss: bool = False):
        super().__init__(preset, norm_pix_loss=norm_pix_loss)
        p = preset
        voxels = p.tubelet * p.patch_size**3
        self.patch_embed = nn.Linear(2 * voxels, p.embed_dim)
        self.encoder = Transformer(p.embed_dim, p.depths[0], p.num_heads[0], p.mlp_ratio)
        self.decoder_embed = nn.Linear(p.embed_dim, p.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(p.decoder_dim))
        self.decoder = Transformer(p.decoder_dim, p.decoder_depth, p.decoder_heads, p.mlp_ratio)
        self.head = nn.Linear(p.decoder_dim, voxels)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _grid(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        """Token grid ``(T', gd, gh, gw)`` of working-resolution ``x (B, T, D, H, W)``."""
        tt = self.preset.tubelet
        if x.shape[1] % tt:
            raise ValueError(f"{x.shape[1]} frames are not a multiple of the tubelet ({tt} frames)")
        return (x.shape[1] // tt, *(size // self.preset.patch_size for size in x.shape[2:]))

    def _encode(
        self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible brain tokens.

        Returns
        -------
        latent : torch.Tensor, shape (B, Nv, C)
            Encoder output, padded to the most visible tokens ``Nv`` of a sample.
        index, valid : torch.Tensor, shape (B, Nv)
            Flat token index in the grid ``(T', gd, gh, gw)`` of each slot, and its validity.
        brain_flat : torch.BoolTensor, shape (B, N)
            Tokens holding brain, ``N = T'*gd*gh*gw``.
        """
        p, tt = self.preset.patch_size, self.preset.tubelet
        grid = self._grid(x)
        b, n = x.shape[0], grid[0] * grid[1] * grid[2] * grid[3]
        brain_flat = brain_tokens(brain, p)[:, None].expand(b, grid[0], *grid[1:]).reshape(b, n)
        hidden = patchify(self.hidden_voxels(x, mask), p, tt).reshape(b, n, -1)  # (B, N, P)
        visible = brain_flat
        if mask is not None:  # a token is dropped when it is hidden in every frame of its tubelet
            hidden_tokens = mask.tokens.expand(b, x.shape[1], *grid[1:]).reshape(b, grid[0], tt, -1)
            visible = visible & ~hidden_tokens.all(2).reshape(b, n)
        index, valid = pack(visible)  # (B, Nv)
        rows = index[..., None].expand(-1, -1, hidden.shape[-1])  # (B, Nv, P)
        values = patchify(x, p, tt).reshape(b, n, -1).gather(1, rows)  # (B, Nv, P)
        hid = hidden.gather(1, rows)
        tokens = self.patch_embed(torch.cat([values.masked_fill(hid, 0.0), hid.to(x.dtype)], -1))
        pos = sincos_embedding_4d(grid, tokens.shape[-1], x.device)[index]  # (B, Nv, C)
        return self.encoder(tokens + pos.to(tokens.dtype), valid), index, valid, brain_flat

    @staticmethod
    def _mean(latent: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean over the valid slots: ``(B, N, C) -> (B, C)`` (0 for a sample without any)."""
        weight = valid[..., None].to(latent.dtype)
        return (latent * weight).sum(1) / weight.sum(1).clamp_min(1.0)

    def _reconstruct(
        self, x: torch.Tensor, brain: torch.Tensor, mask: Mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        latent, index, valid, brain_flat = self._encode(x, brain, mask)
        b, n = brain_flat.shape
        grid = self._grid(x)
        slots, slot_valid = pack(brain_flat)  # (B, Nb): the decoder's tokens
        nb = slots.shape[1]
        # Slot of each encoded token among its sample's brain tokens; padding goes to slot Nb.
        rank = brain_flat.cumsum(1) - 1  # (B, N)
        slot = torch.where(valid, rank.gather(1, index), nb)  # (B, Nv)
        y = self.decoder_embed(latent)  # (B, Nv, Cd)
        cd = y.shape[-1]
        z = self.mask_token.to(y.dtype).expand(b, nb + 1, cd)
        z = z.scatter(1, slot[..., None].expand(-1, -1, cd), y)[:, :nb]  # (B, Nb, Cd)
        z = z + sincos_embedding_4d(grid, cd, x.device)[slots].to(z.dtype)
        out = self.head(self.decoder(z, slot_valid)) * slot_valid[..., None]  # (B, Nb, P)
        pred = out.new_zeros(b, n, out.shape[-1]).scatter(
            1, slots[..., None].expand_as(out), out)  # (B, N, P); background stays 0
        pred = unpatchify(pred.view(b, *grid, -1), self.preset.patch_size, self.preset.tubelet)
        return pred, self._mean(latent, valid)

    def _embed(self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """The mean of the encoder output over the visible brain tokens of all frames."""
        latent, _, valid, _ = self._encode(x, brain, mask)
        return self._mean(latent, valid)

    def _embed_tokens(
        self, x: torch.Tensor, brain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder output put back on the token grid (0 on background tokens)."""
        latent, index, valid, brain_flat = self._encode(x, brain, None)
        grid = self._grid(x)
        b, n, c = brain_flat.shape[0], brain_flat.shape[1], latent.shape[-1]
        # Padding slots point at background tokens, which are 0 whatever they receive.
        tokens = latent.new_zeros(b, n, c).scatter(1, index[..., None].expand(-1, -1, c),
                                                   latent * valid[..., None])
        tokens = tokens.view(b, *grid, c)  # (B, T', gd, gh, gw, C)
        return self._mean(latent, valid), tokens, brain_tokens(brain, self.preset.patch_size)
