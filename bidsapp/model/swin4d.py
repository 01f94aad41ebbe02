"""A 4D Swin transformer encoder with the NeuroSTORM / SwiFT layout.

Tokens are ``p x p x p x 1`` patches of one frame. Each stage adds learned spatial positional
embeddings and fixed sinusoidal temporal ones (so any number of frames works), then runs Swin
blocks that attend inside 4D windows ``(wd, wh, ww, wt)``, every second block with windows
shifted cyclically by half a window (Liu et al. 2021; Video Swin, Liu et al. 2022). Windows larger
than the grid are clamped to it; grids that the window does not divide are padded, and padded
tokens are never attended to. Between stages, patch merging halves space (never time) and doubles
the channels.

Token tensors are laid out ``(B, T, D, H, W, C)`` throughout; windows are given as
``(wd, wh, ww, wt)`` as in the presets.

The masked autoencoder (:class:`SwinMaskedAutoencoder`) replaces tokens the mask marks as hidden by
a learned mask token after the patch embedding (SimMIM, as NeuroSTORM) and encodes every token of
the cube; its decoder undoes the patch merging with linear "pixel-shuffle" upsampling from the
last stage and maps every token to its ``p^3`` voxels.

Background skipping. A token whose input is exactly 0 and that is not hidden embeds to the patch
embedding's bias, so the embedding is computed only for the other tokens; the decoder head runs
only on tokens that hold brain (``pred`` is 0 elsewhere, where the loss has no weight). Both are
exact. Skipping attention windows is not: a window without brain is a function of its positions
only if its input is 0 and unmasked and, from the shifted block on, if its tokens never shared a
window with brain, so its output could only be reused from a pass over an empty input with the
current weights (again at every training step). With 48 mm windows on the AAL3 brain, only 14% of
the first stage-0 windows (and none of later stages) hold no brain token: that pass and the
gathering would cost more than they save.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bidsapp.model.layers import (
    Block,
    blocks,
    brain_tokens,
    depth_to_space,
    init_weights,
    sinusoidal_embedding,
    space_to_depth,
)
from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.masking import Mask
from bidsapp.model.presets import ModelPreset

Shape4 = tuple[int, int, int, int]  # (T, D, H, W) in tokens


def clamp_window(grid: Shape4, window: Shape4, shift: Shape4) -> tuple[Shape4, Shape4]:
    """Clamp the window to the grid where the grid is smaller; no shift along such axes."""
    size = tuple(min(g, w) for g, w in zip(grid, window, strict=True))
    shift = tuple(0 if g <= w else s for g, w, s in zip(grid, window, shift, strict=True))
    return size, shift


def window_partition(x: torch.Tensor, window: Shape4) -> torch.Tensor:
    """``(B, T, D, H, W, C) -> (nW, B, N, C)``, ``N = wt*wd*wh*ww``; the grid must be divisible."""
    b, t, d, h, w, c = x.shape
    wt, wd, wh, ww = window
    x = x.view(b, t // wt, wt, d // wd, wd, h // wh, wh, w // ww, ww, c)
    x = x.permute(1, 3, 5, 7, 0, 2, 4, 6, 8, 9)
    return x.reshape(-1, b, wt * wd * wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Shape4, grid: Shape4) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(nW, B, N, C) -> (B, T, D, H, W, C)``."""
    t, d, h, w = grid
    wt, wd, wh, ww = window
    b, c = windows.shape[1], windows.shape[-1]
    x = windows.view(t // wt, d // wd, h // wh, w // ww, b, wt, wd, wh, ww, c)
    x = x.permute(4, 0, 5, 1, 6, 2, 7, 3, 8, 9)
    return x.reshape(b, t, d, h, w, c)


def window_attention_mask(
    grid: Shape4, window: Shape4, shift: Shape4, device: torch.device
) -> torch.Tensor | None:
    """Which token pairs of each window may attend: ``(nW, 1, N, N)`` bool, or None for all.

    Tokens are labelled in the un-shifted, padded grid: along an axis shifted by ``s``, positions
    ``< s`` form one segment and the rest another (after the cyclic shift they only share the last
    window, where they are not neighbours); padded positions get label -1. The labels are shifted
    and partitioned like the tokens, and two tokens attend iff their labels are equal, so real
    tokens never see padding or tokens across the shift boundary.
    """
    padded = tuple(math.ceil(g / w) * w for g, w in zip(grid, window, strict=True))
    if padded == grid and not any(shift):
        return None
    code = torch.zeros(padded, dtype=torch.long, device=device)  # (Tp, Dp, Hp, Wp)
    is_pad = torch.zeros(padded, dtype=torch.bool, device=device)
    for axis, (size, length, s) in enumerate(zip(padded, grid, shift, strict=True)):
        view = [1, 1, 1, 1]
        view[axis] = size
        pos = torch.arange(size, device=device).view(view)
        code = code + (pos >= s).long() * 2**axis
        is_pad = is_pad | (pos >= length)
    code = code.masked_fill(is_pad, -1)
    if any(shift):
        code = code.roll([-s for s in shift], dims=(0, 1, 2, 3))
    code = window_partition(code[None, ..., None], window)[:, 0, :, 0]  # (nW, N)
    return (code[:, :, None] == code[:, None, :]).unsqueeze(1)


class SwinBlock4D(Block):
    """Pre-norm transformer block on 4D windows, optionally shifted by half a window."""

    def __init__(
        self, dim: int, num_heads: int, window_size: Shape4, *, shifted: bool, mlp_ratio: float
    ):
        super().__init__(dim, num_heads, mlp_ratio)
        wd, wh, ww, wt = window_size
        self.window = (wt, wd, wh, ww)  # (wt, wd, wh, ww): the order of the token axes
        self.shift = tuple(w // 2 for w in self.window) if shifted else (0, 0, 0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D, H, W, C) -> (B, T, D, H, W, C)``."""
        grid = tuple(x.shape[1:5])
        window, shift = clamp_window(grid, self.window, self.shift)
        y = self.norm1(x)
        pad = [(-g) % w for g, w in zip(grid, window, strict=True)]  # per (T, D, H, W)
        if any(pad):
            y = F.pad(y, (0, 0, 0, pad[3], 0, pad[2], 0, pad[1], 0, pad[0]))
        padded = tuple(y.shape[1:5])
        dims = (1, 2, 3, 4)
        if any(shift):
            y = y.roll([-s for s in shift], dims=dims)
        mask = window_attention_mask(grid, window, shift, x.device)
        y = window_reverse(self.attn(window_partition(y, window), mask), window, padded)
        if any(shift):
            y = y.roll(list(shift), dims=dims)
        x = x + y[:, : grid[0], : grid[1], : grid[2], : grid[3]]
        return x + self.mlp(self.norm2(x))


class PatchEmbed4D(nn.Module):
    """Linear embedding of ``p x p x p x 1`` patches.

    ``(B, T, D, H, W, Cin) -> (B, T, D/p, H/p, W/p, C)``.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size**3 * in_chans, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patches of ``x`` to token embeddings."""
        return self.proj(space_to_depth(x, self.patch_size))


class PatchMerging(nn.Module):
    """Merge 2x2x2 neighbours in space, not time: ``(..., D, H, W, C) -> (.., D/2, .., 2C)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Merge 2x2x2 neighbouring tokens into one."""
        return self.reduction(self.norm(space_to_depth(x, 2)))


class Swin4DEncoder(nn.Module):
    """Stages of 4D Swin blocks with spatial patch merging in between.

    Parameters
    ----------
    grid_shape : tuple of int
        Token grid ``(gd, gh, gw)`` of one frame at stage 0; divisible by ``2**(n_stages-1)``.
    embed_dim : int
        Channels ``C0`` of stage 0; stage ``i`` has ``C0 * 2**i``.
    depths, num_heads : tuple of int
        Blocks and attention heads per stage.
    window_size : tuple of int
        ``(wd, wh, ww, wt)`` in tokens.
    mlp_ratio : float
        Hidden width of the block MLPs relative to the channels.
    """

    def __init__(
        self,
        grid_shape: tuple[int, int, int],
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        window_size: Shape4,
        mlp_ratio: float,
    ):
        super().__init__()
        n_stages = len(depths)
        if len(num_heads) != n_stages:
            raise ValueError("depths and num_heads need one entry per stage")
        if any(g % 2 ** (n_stages - 1) for g in grid_shape):
            raise ValueError(f"grid {grid_shape} cannot be halved {n_stages - 1} times")
        self.dims = tuple(embed_dim * 2**i for i in range(n_stages))
        self.pos_embeds = nn.ParameterList(
            # (gd_i, gh_i, gw_i, C_i): broadcast over batch and frames
            nn.Parameter(torch.zeros(*(g // 2**i for g in grid_shape), dim))
            for i, dim in enumerate(self.dims)
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*(
                SwinBlock4D(dim, heads, window_size, shifted=j % 2 == 1, mlp_ratio=mlp_ratio)
                for j in range(depth)
            ))
            for dim, depth, heads in zip(self.dims, depths, num_heads, strict=True)
        )
        self.merges = nn.ModuleList(PatchMerging(dim) for dim in self.dims[:-1])
        self.norm = nn.LayerNorm(self.dims[-1])
        for pos in self.pos_embeds:
            nn.init.trunc_normal_(pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Encode ``tokens (B, T, gd, gh, gw, C0)``.

        Returns the output of every stage, ``(B, T, gd/2^i, gh/2^i, gw/2^i, C_i)``; the last one
        is layer-normalised.
        """
        n_frames = tokens.shape[1]
        outputs = []
        x = tokens
        for i, (stage, pos, dim) in enumerate(zip(self.stages, self.pos_embeds, self.dims,
                                                  strict=True)):
            if i > 0:
                x = self.merges[i - 1](x)
            time = sinusoidal_embedding(n_frames, dim, x.device).to(x.dtype)  # (T, C_i)
            x = stage(x + pos + time[:, None, None, None, :])
            outputs.append(x)
        outputs[-1] = self.norm(outputs[-1])
        return outputs


class SwinDecoder(nn.Module):
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
        self.decoder = SwinDecoder(dims, preset.patch_size)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _tokens(self, x: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """Patch embedding of ``x (B, T, D, H, W)``: ``(B, T, gd, gh, gw, C0)``."""
        hidden = self.hidden_voxels(x, mask)  # (B, T, D, H, W)
        if not self.skip_background:
            return self.patch_embed(torch.stack([x.masked_fill(hidden, 0.0), hidden.to(x.dtype)], -1))
        p = self.preset.patch_size
        values = blocks(x, p)  # (B, T, gd, gh, gw, p^3)
        flags = blocks(hidden, p)  # (B, T, gd, gh, gw, p^3)
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
