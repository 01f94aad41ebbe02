"""What both backbones (and the region grid) share: blocks of voxels, attention, position embeddings.

- :func:`space_to_depth` / :func:`depth_to_space`: the one way a volume is cut into cubic blocks
  (tokens, patch merging, decoder upsampling, region votes, readout weights) and put back;
- :class:`MultiHeadAttention` and :class:`Block`: pre-norm transformer layers;
- :func:`sinusoidal_embedding`, :func:`sincos_embedding_4d`: fixed position embeddings;
- :func:`init_weights`: the MAE initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def blocks(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """The voxels of each block: ``(..., D, H, W) -> (..., D/f, H/f, W/f, f**3)``."""
    return space_to_depth(volume[..., None], factor)


def brain_tokens(brain: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Tokens holding at least one brain voxel: ``(B, D, H, W) -> (B, D/p, H/p, W/p)`` bool."""
    return blocks(brain, patch_size).any(-1)


def sinusoidal_embedding(n_positions: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed sine/cosine embedding ``(n_positions, dim)`` of positions 0, 1, ... (Vaswani 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device) / half)
    angles = torch.arange(n_positions, device=device, dtype=torch.float32)[:, None] * freqs
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, dim - 2 * half))  # odd dim: one zero channel


def sincos_embedding_4d(grid: tuple[int, int, int, int], dim: int,
                        device: torch.device) -> torch.Tensor:
    """Fixed positional embedding of the token grid ``(T', gd, gh, gw)``: ``(T'*gd*gh*gw, dim)``.

    The channels are four sine-cosine embeddings of ``dim/4`` channels, of t, d, h and w.
    """
    axes = [sinusoidal_embedding(n, dim // 4, device) for n in grid]  # (n_i, dim/4) each
    parts = [emb.view([n if i == j else 1 for j in range(4)] + [-1]).expand(*grid, -1)
             for i, (n, emb) in enumerate(zip(grid, axes, strict=True))]
    return torch.cat(parts, -1).flatten(0, 3)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    """``scaled_dot_product_attention``; in float32 under the CPU's bf16 autocast.

    PyTorch's CPU attention kernel is slower in bfloat16 than in float32 (its backward 2-5x at
    roimae's window shapes: docs/performance.md), while the linear layers around it gain from
    bf16 (AVX512-BF16, AMX). On CUDA the bf16 kernels are used as they are.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                  attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
        out = _attention(q, k, v, mask)  # (nW, B*h, N, C/h)
        out = out.view(n_win, b, h, n, c // h).transpose(2, 3).reshape(n_win, b, n, c)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual connection.

    Global attention within each sample; :class:`bidsapp.model.swin4d.SwinBlock4D` keeps the
    layers and attends within windows.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``x (B, N, C)``, ``keys (B, 1, 1, N)`` bool (True = may be attended to) -> ``(B, N, C)``."""
        x = x + self.attn(self.norm1(x)[:, None], keys)[:, 0]  # each sample is its own group
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: truncated-normal linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
