"""SwiFT's ``SwinTransformer4D`` encoder (Kim et al. 2023), exactly, so that its checkpoints load.

The network of Transconnectome/SwiFT at the commit of its released weights
(``swin4d_transformer_ver7.py``), rewritten with the same parameter names and shapes: a state dict
maps one to one and the outputs agree to float32 rounding. Where SwiFT differs from roimae's
:mod:`bidsapp.model.swin4d`, this module follows SwiFT:

- the input is ``(B, C_in, D, H, W, T)`` and patches are ``p_d x p_h x p_w x p_t`` (``p_t = 1``),
  embedded by one linear layer (``patch_embed.fc``) of the features ordered
  ``(p_d, p_h, p_w, p_t, C_in)``;
- every stage adds learned spatial (``pos_embed``) and temporal (``time_embed``, one per frame,
  cut to the frames given) embeddings before its blocks (``pos_embeds[i]``);
- stage 0 uses ``first_window_size``, the other stages ``window_size``; windows larger than the
  grid are clamped to it (no shift along such axes); with ``last_layer_full_MSA`` the last stage
  attends over its whole spatial grid (windows ``grid / 2**(stages-1)`` in space,
  ``window_size[3]`` frames) without shifting;
- tokens are laid out ``(B, D, H, W, T, C)``, windows ordered ``(B, nD, nH, nW, nT)`` and the
  tokens of a window ``(wd, wh, ww, wt)``; every second block rolls the grid by half a window;
- grids the window does not divide are padded with zero tokens *after* ``norm1``, and attention
  reaches them as SwiFT's does: unshifted windows attend to padding without a mask, shifted
  windows add SwiFT's region mask (-100, not -inf, between tokens of different regions of the
  padded, rolled grid);
- no relative position bias; MLPs are ``Linear, GELU, Linear`` (``mlp.linear1``, ``mlp.linear2``);
- patch merging (``layers[i].downsample``) concatenates the 2x2x2 neighbours in the order
  ``(d, h, w)`` and maps them with ``norm`` and ``reduction`` to ``c_multiplier`` times the
  channels; it ends every stage but the last (``layers[i]`` is blocks then merging);
- no final norm in the forward pass (SwiFT's ``norm`` and ``head`` are unused by its encoder; the
  checkpoint reader drops them). Dropout and drop-path are identity at inference and left out.

:class:`SwiFT` is the encoder; :mod:`bidsapp.model.neurostorm` reuses the layers with a Mamba
mixer in place of attention. Configurations and checkpoints: :mod:`bidsapp.model.upstream`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Shape4 = tuple[int, int, int, int]  # (D, H, W, T), SwiFT's order

#: SwiFT's additive attention mask between tokens of different regions of a shifted window.
MASK_VALUE = -100.0


def clamp_window(grid: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> tuple[Shape4, Shape4]:
    """Clamp the window to the grid where the grid is not larger; no shift along such axes."""
    size = tuple(g if g <= w else w for g, w in zip(grid, window, strict=True))
    shift = tuple(0 if g <= w else s for g, w, s in zip(grid, window, shift, strict=True))
    return size, shift


def window_partition(x: torch.Tensor, window: Shape4) -> torch.Tensor:
    """``(B, D, H, W, T, C) -> (B*nW, wd*wh*ww*wt, C)``, windows ordered ``(B, nD, nH, nW, nT)``."""
    b, d, h, w, t, c = x.shape
    wd, wh, ww, wt = window
    x = x.view(b, d // wd, wd, h // wh, wh, w // ww, ww, t // wt, wt, c)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8, 9).reshape(-1, wd * wh * ww * wt, c)


def window_reverse(windows: torch.Tensor, window: Shape4, grid: Shape4) -> torch.Tensor:
    """Inverse of :func:`window_partition` on a ``grid`` the window divides: ``(B, D, H, W, T, C)``."""
    d, h, w, t = grid
    wd, wh, ww, wt = window
    c = windows.shape[-1]
    x = windows.view(-1, d // wd, h // wh, w // ww, t // wt, wd, wh, ww, wt, c)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4, 8, 9).reshape(-1, d, h, w, t, c)


def shifted_window_mask(padded: Shape4, window: Shape4, shift: Shape4, device: torch.device) -> torch.Tensor:
    """SwiFT's mask of a shifted window: ``(nW, N, N)``, 0 within a region, -100 across regions.

    Regions are labelled on the padded grid as it is after the roll: along an axis shifted by
    ``s`` with window ``w``, positions ``< P-w``, ``[P-w, P-s)`` and ``>= P-s`` are three regions;
    along an axis without shift, one region (SwiFT's slices ``(-w, -0)`` and ``(-0, None)``).
    Padded positions are labelled like real ones, as in SwiFT.
    """
    labels = torch.zeros(padded, dtype=torch.long, device=device)
    for axis, (size, w, s) in enumerate(zip(padded, window, shift, strict=True)):
        pos = torch.arange(size, device=device)
        region = (pos >= size - w).long() + (pos >= size - s).long() if s else torch.zeros_like(pos)
        view = [1, 1, 1, 1]
        view[axis] = size
        labels = labels * 3 + region.view(view)
    labels = window_partition(labels[None, ..., None], window)[..., 0]  # (nW, N)
    same = labels[:, :, None] == labels[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill_(~same, MASK_VALUE)


class Mlp(nn.Module):
    """``Linear, GELU, Linear`` with MONAI ``MLPBlock``'s names (``linear1``, ``linear2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to the last axis."""
        return self.linear2(F.gelu(self.linear1(x)))


class WindowAttention4D(nn.Module):
    """Multi-head self-attention inside windows, SwiFT's (no relative position bias)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x (B*nW, N, C)``, additive ``mask (nW, N, N)`` or None -> ``(B*nW, N, C)``."""
        bw, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B*nW, heads, N, c/heads)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # window-major, (nW, B*heads, N, c/heads): 4D, which keeps the CPU's fused kernel
            nw = mask.shape[0]
            q, k, v = (t.reshape(bw // nw, nw, heads, n, -1).transpose(0, 1).reshape(nw, -1, n, c // heads)
                       for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None].to(q.dtype))
            out = out.reshape(nw, bw // nw, heads, n, -1).transpose(0, 1)
        return self.proj(out.reshape(bw, heads, n, -1).transpose(1, 2).reshape(bw, n, c))


class WindowBlock(nn.Module):
    """Pre-norm block on (shifted) 4D windows: ``x + mix(norm1(x))``, then ``x + mlp(norm2(x))``.

    Subclasses give the token mixer (:meth:`mix`): attention here (``attn``), Mamba in NeuroSTORM.
    """

    def __init__(self, dim: int, window_size: Shape4, shift_size: Shape4, mlp_ratio: float):
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(shift_size)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def mix(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mix the tokens of every window: ``(B*nW, N, C) -> (B*nW, N, C)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x (B, D, H, W, T, C)``; ``mask``: the stage's shifted-window mask, or None."""
        grid = tuple(x.shape[1:5])
        window, shift = clamp_window(grid, self.window_size, self.shift_size)
        y = self.norm1(x)
        pad = [(-g) % w for g, w in zip(grid, window, strict=True)]
        if any(pad):  # zero tokens after the norm, as SwiFT
            y = F.pad(y, (0, 0, 0, pad[3], 0, pad[2], 0, pad[1], 0, pad[0]))
        padded = tuple(y.shape[1:5])
        shifted = any(shift)
        if shifted:
            y = torch.roll(y, [-s for s in shift], dims=(1, 2, 3, 4))
        y = window_reverse(self.mix(window_partition(y, window), mask if shifted else None),
                           window, padded)
        if shifted:
            y = torch.roll(y, list(shift), dims=(1, 2, 3, 4))
        x = x + y[:, : grid[0], : grid[1], : grid[2], : grid[3]]
        return x + self.mlp(self.norm2(x))


class SwinBlock4D(WindowBlock):
    """SwiFT's ``SwinTransformerBlock4D``: window attention (``attn``) and an MLP."""

    def __init__(self, dim: int, num_heads: int, window_size: Shape4, shift_size: Shape4,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__(dim, window_size, shift_size, mlp_ratio)
        self.attn = WindowAttention4D(dim, num_heads, qkv_bias)

    def mix(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention inside every window, with the shifted-window mask if given."""
        return self.attn(windows, mask)


class PatchEmbed4D(nn.Module):
    """SwiFT's ``PatchEmbed``: ``(B, C_in, D, H, W, T) -> (B, D/pd, H/ph, W/pw, T/pt, C)``."""

    def __init__(self, img_size: Shape4, patch_size: Shape4, in_chans: int, embed_dim: int,
                 patch_norm: bool = False):
        super().__init__()
        if patch_size[3] != 1:
            raise ValueError("SwiFT embeds one frame per patch: patch_size[3] must be 1")
        self.img_size = tuple(img_size)
        self.patch_size = tuple(patch_size)
        self.grid_size = tuple(i // p for i, p in zip(img_size[:3], patch_size[:3], strict=True))
        self.fc = nn.Linear(in_chans * math.prod(patch_size), embed_dim)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed every patch of ``x``, channels last."""
        b, c, d, h, w, t = x.shape
        if (d, h, w) != self.img_size[:3]:
            raise ValueError(f"input grid {(d, h, w)} is not the model's {self.img_size[:3]}")
        pd, ph, pw, pt = self.patch_size
        gd, gh, gw = self.grid_size
        x = x.reshape(b, c, gd, pd, gh, ph, gw, pw, t // pt, pt)
        x = x.permute(0, 2, 4, 6, 8, 3, 5, 7, 9, 1).reshape(b, gd, gh, gw, t // pt, -1)
        return self.norm(self.fc(x))


class PositionalEmbedding(nn.Module):
    """Learned spatial ``pos_embed (1, C, d, h, w, 1)`` and temporal ``time_embed (1, C, 1, 1, 1, T)``."""

    def __init__(self, dim: int, patch_dim: Shape4):
        super().__init__()
        d, h, w, t = patch_dim
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, d, h, w, 1))
        self.time_embed = nn.Parameter(torch.zeros(1, dim, 1, 1, 1, t))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.time_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add both to ``x (B, D, H, W, T, C)``, the temporal one for the first ``T`` frames."""
        t = x.shape[4]
        if t > self.time_embed.shape[-1]:
            raise ValueError(f"{t} frames; the model has time embeddings for "
                             f"{self.time_embed.shape[-1]}")
        pos = self.pos_embed.permute(0, 2, 3, 4, 5, 1)  # (1, d, h, w, 1, C)
        time = self.time_embed[..., :t].permute(0, 2, 3, 4, 5, 1)  # (1, 1, 1, 1, T, C)
        return x + pos + time


class PatchMerging(nn.Module):
    """SwiFT's ``PatchMergingV2``: 2x2x2 neighbours in space (not time) to ``c_multiplier * C``."""

    def __init__(self, dim: int, c_multiplier: int = 2):
        super().__init__()
        self.reduction = nn.Linear(8 * dim, c_multiplier * dim, bias=False)
        self.norm = nn.LayerNorm(8 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W, T, C) -> (B, D/2, H/2, W/2, T, c*C)``; neighbours ordered ``(d, h, w)``."""
        b, d, h, w, t, c = x.shape
        x = x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, t, c)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(b, d // 2, h // 2, w // 2, t, 8 * c)
        return self.reduction(self.norm(x))


BlockFactory = Callable[[Shape4], WindowBlock]  # shift -> block


class Stage(nn.Module):
    """SwiFT's ``BasicLayer``: ``depth`` blocks (every second shifted), then ``downsample`` if any.

    ``full_attention``: SwiFT's ``BasicLayer_FullAttention`` (no block is shifted).
    """

    def __init__(self, block: BlockFactory, depth: int, window_size: Shape4, *,
                 full_attention: bool = False, downsample: nn.Module | None = None):
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = (0, 0, 0, 0) if full_attention else tuple(w // 2 for w in window_size)
        self.blocks = nn.ModuleList(
            block(self.shift_size if j % 2 else (0, 0, 0, 0)) for j in range(depth)
        )
        self.downsample = downsample

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks on ``x (B, D, H, W, T, C)``, with the stage's shifted-window mask."""
        grid = tuple(x.shape[1:5])
        window, shift = clamp_window(grid, self.window_size, self.shift_size)
        mask = None
        if any(shift):
            padded = tuple(math.ceil(g / w) * w for g, w in zip(grid, window, strict=True))
            mask = shifted_window_mask(padded, window, shift, x.device)
        for blk in self.blocks:
            x = blk(x, mask)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W, T, C)`` to the next stage's grid and channels."""
        x = self.run_blocks(x)
        return x if self.downsample is None else self.downsample(x)


def stage_windows(grid: tuple[int, int, int], window_size: Shape4, first_window_size: Shape4,
                  n_stages: int, last_layer_full_MSA: bool) -> list[Shape4]:
    """SwiFT's window of every stage (the first, the middle ones, the last possibly global)."""
    windows = [tuple(first_window_size)] + [tuple(window_size)] * (n_stages - 1)
    if last_layer_full_MSA:
        f = 2 ** (n_stages - 1)
        windows[-1] = (grid[0] // f, grid[1] // f, grid[2] // f, window_size[3])
    return windows


class SwinEncoder4D(nn.Module):
    """SwiFT's encoder layout with any window block: ``patch_embed``, ``pos_embeds``, ``layers``.

    Parameters
    ----------
    config : UpstreamConfig
        Sizes (:class:`bidsapp.model.upstream.UpstreamConfig`).
    block : callable
        ``block(stage, dim, window, shift) -> WindowBlock``.
    """

    def __init__(self, config, block: Callable[[int, int, Shape4, Shape4], WindowBlock]):
        super().__init__()
        self.config = config
        n_stages = len(config.depths)
        self.patch_embed = PatchEmbed4D(config.img_size, config.patch_size, config.in_chans,
                                        config.embed_dim, config.patch_norm)
        grid = self.patch_embed.grid_size
        dims = config.stage_dims()
        frames = config.img_size[3] // config.patch_size[3]
        self.pos_embeds = nn.ModuleList(
            PositionalEmbedding(dim, (*(g // 2**i for g in grid), frames)) for i, dim in enumerate(dims)
        )
        windows = stage_windows(grid, config.window_size, config.first_window_size, n_stages,
                                config.last_layer_full_MSA)
        self.layers = nn.ModuleList()
        for i, (dim, depth, window) in enumerate(zip(dims, config.depths, windows, strict=True)):
            last = i == n_stages - 1
            self.layers.append(Stage(
                lambda shift, i=i, dim=dim, window=window: block(i, dim, window, shift),
                depth, window, full_attention=last and config.last_layer_full_MSA,
                downsample=None if last else PatchMerging(dim, config.c_multiplier),
            ))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding of ``x (B, C_in, D, H, W, T)`` in float32: ``(B, d, h, w, T, C0)``."""
        if x.ndim != 6 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"input must be (B, {self.config.in_chans}, D, H, W, T); got {tuple(x.shape)}")
        return self.patch_embed(x.float())

    def run_layers(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Stages on embedded ``tokens``: the output of every ``layers[i]``, channels last."""
        return self.features(tokens)[1]

    def features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage-0 blocks' output on the token grid (before its merging) and every ``layers[i]``'s."""
        first = self.layers[0].run_blocks(self.pos_embeds[0](tokens))
        merge = self.layers[0].downsample
        outputs = [first if merge is None else merge(first)]
        for pos, layer in zip(self.pos_embeds[1:], self.layers[1:], strict=True):
            outputs.append(layer(pos(outputs[-1])))
        return first, outputs

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every ``layers[i]`` in SwiFT's layout ``(B, C_i, d_i, h_i, w_i, T)``.

        Parameters
        ----------
        x : torch.Tensor, shape (B, C_in, D, H, W, T)
            As SwiFT's forward takes it: the configured ``D, H, W`` (96^3 released) and at most
            the configured number of frames.

        Returns
        -------
        list of torch.Tensor
            Stage ``i`` ends with its patch merging, as SwiFT's ``layers[i]``; the last is what
            SwiFT's encoder returns.
        """
        return [channels_first(o) for o in self.run_layers(self.embed(x))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output, ``(B, C_L, d_L, h_L, w_L, T)`` (SwiFT's forward)."""
        return self.encode(x)[-1]


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, D, H, W, T, C) -> (B, C, D, H, W, T)`` (a view)."""
    return x.permute(0, 5, 1, 2, 3, 4)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W, T) -> (B, D, H, W, T, C)`` (a view)."""
    return x.permute(0, 2, 3, 4, 5, 1)


class SwiFT(SwinEncoder4D):
    """SwiFT's ``SwinTransformer4D`` encoder (see the module docstring).

    Parameters
    ----------
    config : UpstreamConfig
        Sizes; :data:`bidsapp.model.upstream.SWIFT_RELEASED` is the released configuration.
    """

    def __init__(self, config):
        super().__init__(config, lambda stage, dim, window, shift: SwinBlock4D(
            dim, config.num_heads[stage], window, shift, config.mlp_ratio, config.qkv_bias))
