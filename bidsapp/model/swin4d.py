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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Shape4 = tuple[int, int, int, int]  # (T, D, H, W) in tokens


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Fold ``factor**3`` neighbouring positions into channels.

    ``(..., D, H, W, C) -> (..., D/f, H/f, W/f, f*f*f*C)``, channels ordered (fd, fh, fw, C).
    """
    *lead, d, h, w, c = x.shape
    f = factor
    x = x.reshape(*lead, d // f, f, h // f, f, w // f, f, c)
    n = len(lead)
    x = x.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6)
    return x.reshape(*lead, d // f, h // f, w // f, f**3 * c)


def depth_to_space(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`: ``(..., d, h, w, f*f*f*C) -> (..., fd, fh, fw, C)``."""
    *lead, d, h, w, c = x.shape
    f = factor
    x = x.reshape(*lead, d, h, w, f, f, f, c // f**3)
    n = len(lead)
    x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5, n + 6)
    return x.reshape(*lead, d * f, h * f, w * f, c // f**3)


def sinusoidal_embedding(n_positions: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed sine/cosine embedding ``(n_positions, dim)`` of positions 0, 1, ... (Vaswani 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device) / half)
    angles = torch.arange(n_positions, device=device, dtype=torch.float32)[:, None] * freqs
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, dim - 2 * half))  # odd dim: one zero channel


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


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention inside groups of tokens, through ``scaled_dot_product_attention``.

    A group is a window (swin4d: ``nW`` windows of ``B`` samples) or a whole sample (vit4d: ``B``
    groups of one sample each); tokens attend only within their group.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x (G, B, N, C)``, ``mask (G, 1, N or 1, N)`` or None -> ``(G, B, N, C)``.

        ``mask`` is boolean (True = may be attended to) or additive, and is shared by the ``B``
        samples and the heads of a group.
        """
        n_win, b, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(n_win, b, n, 3, h, c // h)
        # Batch and heads share one axis so that the (nW, 1, N, N) mask broadcasts without a copy.
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, n_win, b * h, n, c // h)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (nW, B*h, N, C/h)
        out = out.view(n_win, b, h, n, c // h).transpose(2, 3).reshape(n_win, b, n, c)
        return self.proj(out)


class SwinBlock4D(nn.Module):
    """Pre-norm transformer block on 4D windows, optionally shifted by half a window."""

    def __init__(
        self, dim: int, num_heads: int, window_size: Shape4, *, shifted: bool, mlp_ratio: float
    ):
        super().__init__()
        wd, wh, ww, wt = window_size
        self.window = (wt, wd, wh, ww)  # (wt, wd, wh, ww): the order of the token axes
        self.shift = tuple(w // 2 for w in self.window) if shifted else (0, 0, 0, 0)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

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
        return self.proj(space_to_depth(x, self.patch_size))


class PatchMerging(nn.Module):
    """Merge 2x2x2 neighbours in space, not time: ``(..., D, H, W, C) -> (.., D/2, .., 2C)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
