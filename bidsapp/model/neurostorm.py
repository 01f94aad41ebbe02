"""NeuroSTORM (CUHK-AIM-Group) exactly: SwiFT's 4D layout with a Mamba-1 mixer in every window.

The encoder and MAE decoder of ``models/neurostorm.py`` (``NeuroSTORM``, ``NeuroSTORMMAE``),
rewritten with the same parameter names and shapes so that its Lightning checkpoints load one to
one (:mod:`bidsapp.model.upstream`). Everything :mod:`bidsapp.model.swift` lists holds, except
that each block mixes the tokens of a window with :class:`~bidsapp.model.mamba.Mamba`
(``d_state`` 16, ``d_conv`` 4, ``expand`` 2) instead of attention:

- a window is one sequence in SwiFT's token order ``(wd, wh, ww, wt)`` (time fastest), scanned
  causally; padded tokens (zero after ``norm1``) are part of the sequence, and NeuroSTORM passes no
  shifted-window mask to Mamba, so shifted windows mix tokens across the roll's seams as it does;
- with prompt tuning (NeuroSTORM's latest code, encoder blocks of the fine-tuning model only),
  ``prompt_len`` learned tokens are prepended to every window's sequence and dropped after it.

The MAE (``config.mae``) adds NeuroSTORM's mask tokens and decoder:

- hidden tokens are replaced after the patch embedding, before the first positional embedding.
  Two layouts exist: the released checkpoints have one ``mask_token`` per position of a
  ``window_size`` window, ``(prod(window_size), C)``, used by NeuroSTORM's window masking; the
  latest code has ``mask_token`` ``(C)`` (random and tube masking), ``window_mask_token``
  ``(prod(window_size), C)`` and ``atlas_mask_token`` ``(C)``. :meth:`NeuroSTORM.encode` takes any
  token mask and the kind of mask token (a window token fills every hidden token with the token of
  its position in its window);
- the decoder (:meth:`NeuroSTORM.decode`): ``first_patch_expanding`` (linear, 2x2x2 pixel
  shuffle, norm), then ``layers_up`` (Mamba blocks with ``window_size`` windows, each but the
  last followed by a patch expansion), ``norm_up`` and ``decoder_pred`` (one linear map to the
  ``p^3 * C_in`` voxels of every patch).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from bidsapp.model.mamba import Mamba
from bidsapp.model.swift import (
    Shape4,
    Stage,
    SwinEncoder4D,
    WindowBlock,
    channels_first,
    channels_last,
)

MaskTokenKind = Literal["window", "token", "atlas"]


class MambaBlock4D(WindowBlock):
    """NeuroSTORM's ``SwinTransformerBlock4D``: a Mamba mixer (``mamba``) per window and an MLP."""

    def __init__(self, dim: int, window_size: Shape4, shift_size: Shape4, mlp_ratio: float = 4.0,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, prompt_len: int = 0):
        super().__init__(dim, window_size, shift_size, mlp_ratio)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.prompt = None
        if prompt_len:
            self.prompt = nn.Parameter(torch.zeros(1, prompt_len, dim))
            nn.init.trunc_normal_(self.prompt, std=0.02)

    def mix(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Scan every window as one sequence; the shifted-window ``mask`` is unused, as upstream."""
        if self.prompt is None:
            return self.mamba(windows)
        n = self.prompt.shape[1]
        prompt = self.prompt.to(windows.dtype).expand(windows.shape[0], -1, -1)
        return self.mamba(torch.cat([prompt, windows], 1))[:, n:]


class PatchExpanding(nn.Module):
    """NeuroSTORM's ``PatchExpanding``: ``(.., D, H, W, T, C) -> (.., 2D, 2H, 2W, T, c*c*C/8)``."""

    def __init__(self, dim: int, c_multiplier: int = 2):
        super().__init__()
        self.expand = nn.Linear(dim, c_multiplier * c_multiplier * dim, bias=False)
        self.norm = nn.LayerNorm(dim // c_multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand the channels and shuffle them onto the 2x2x2 finer grid, then normalise."""
        x = self.expand(x)
        b, d, h, w, t, c = x.shape
        x = x.view(b, d, h, w, t, 2, 2, 2, c // 8).permute(0, 1, 5, 2, 6, 3, 7, 4, 8)
        return self.norm(x.reshape(b, 2 * d, 2 * h, 2 * w, t, c // 8))


class DecoderStage(Stage):
    """NeuroSTORM's ``BasicLayerUp``: blocks (every second shifted), then ``upsample`` if any."""

    def __init__(self, block, depth: int, window_size: Shape4, upsample: nn.Module | None):
        super().__init__(block, depth, window_size)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W, T, C)`` to the next finer grid."""
        x = self.run_blocks(x)
        return x if self.upsample is None else self.upsample(x)


class NeuroSTORM(SwinEncoder4D):
    """NeuroSTORM's encoder, and with ``config.mae`` its MAE mask tokens and decoder.

    Parameters
    ----------
    config : UpstreamConfig
        Sizes (:class:`bidsapp.model.upstream.UpstreamConfig`, ``family="neurostorm"``);
        :data:`bidsapp.model.upstream.NEUROSTORM_RELEASED` is the released MAE.
    """

    def __init__(self, config):
        def block(stage: int, dim: int, window: Shape4, shift: Shape4, prompt_len: int = config.prompt_len):
            return MambaBlock4D(dim, window, shift, config.mlp_ratio, config.d_state, config.d_conv,
                                config.expand, prompt_len)

        super().__init__(config, block)
        if not config.mae:
            return
        c = config.embed_dim
        window_volume = math.prod(config.window_size)
        if config.mask_token_layout == "released":
            self.mask_token = nn.Parameter(torch.zeros(window_volume, c))
        else:
            self.mask_token = nn.Parameter(torch.zeros(c))
            self.window_mask_token = nn.Parameter(torch.zeros(window_volume, c))
            self.atlas_mask_token = nn.Parameter(torch.zeros(c))
        n_stages = len(config.depths)
        # Literally as NeuroSTORMMAE builds it (consistent for c_multiplier 2, the only one used).
        self.first_patch_expanding = PatchExpanding(c * 2 ** (n_stages - 1))
        self.layers_up = nn.ModuleList()
        for i in reversed(range(n_stages - 1)):
            dim = c * config.c_multiplier**i
            self.layers_up.append(DecoderStage(
                lambda shift, dim=dim: block(0, dim, config.window_size, shift, prompt_len=0),
                config.depths[i], config.window_size,
                PatchExpanding(dim, config.c_multiplier) if i > 0 else None,
            ))
        self.norm_up = nn.LayerNorm(c)
        self.decoder_pred = nn.Linear(c * 2 ** (n_stages - 1) // 8,
                                      config.patch_size[0] ** 3 * config.in_chans)

    def mask_token_field(self, kind: MaskTokenKind, grid: Shape4) -> torch.Tensor:
        """The token that replaces a hidden token: ``(C,)``, or ``(D, H, W, T, C)`` for window tokens.

        A window token depends on the position in its ``window_size`` window (the windows tile
        ``grid`` from its origin, as NeuroSTORM's window masking; a partial window at the end takes
        the first positions).
        """
        if not self.config.mae:
            raise ValueError("this NeuroSTORM has no mask token (not an MAE checkpoint)")
        released = self.config.mask_token_layout == "released"
        if kind == "window":
            token = self.mask_token if released else self.window_mask_token
            w = self.config.window_size
            token = token.view(*w, -1)
            reps = [-(-g // wi) for g, wi in zip(grid, w, strict=True)]
            field = token.repeat(*reps, 1)
            return field[: grid[0], : grid[1], : grid[2], : grid[3]]
        if released:
            raise ValueError(f"the released mask token layout has only window mask tokens, not {kind!r}")
        if kind == "token":
            return self.mask_token
        if kind == "atlas":
            return self.atlas_mask_token
        raise ValueError(f"mask token kind must be 'window', 'token' or 'atlas'; got {kind!r}")

    def masked_tokens(self, x: torch.Tensor, hidden: torch.Tensor | None = None,
                      mask_token: MaskTokenKind = "window") -> torch.Tensor:
        """Patch embedding of ``x``, hidden tokens replaced: ``(B, d, h, w, T, C0)`` channels last."""
        tokens = self.embed(x)
        if hidden is None:
            return tokens
        if hidden.ndim != 5:
            raise ValueError(f"hidden must be (B, d, h, w, T) (T may be 1); got {tuple(hidden.shape)}")
        field = self.mask_token_field(mask_token, tuple(tokens.shape[1:5])).to(tokens.dtype)
        return torch.where(hidden[..., None].to(tokens.device), field, tokens)

    def encode(self, x: torch.Tensor, hidden: torch.Tensor | None = None,
               mask_token: MaskTokenKind = "window") -> list[torch.Tensor]:
        """The output of every ``layers[i]`` in NeuroSTORM's layout ``(B, C_i, d_i, h_i, w_i, T)``.

        Parameters
        ----------
        x : torch.Tensor, shape (B, C_in, D, H, W, T)
            As NeuroSTORM's forward takes it.
        hidden : torch.BoolTensor, shape (B, d, h, w, T) or (B, d, h, w, 1), optional
            Tokens to replace by a mask token after the patch embedding (MAE only); the last
            output is then NeuroSTORM's ``forward_encoder`` of that masking.
        mask_token : {"window", "token", "atlas"}
            Which mask token (:meth:`mask_token_field`).
        """
        return [channels_first(o) for o in self.run_layers(self.masked_tokens(x, hidden, mask_token))]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """NeuroSTORM's ``forward_decoder``: last stage ``(B, C_L, d_L, h_L, w_L, T)`` -> voxels.

        Returns
        -------
        torch.Tensor, shape (B, C_in, D, H, W, T)
            The reconstruction, in the input's layout.
        """
        if not self.config.mae:
            raise ValueError("this NeuroSTORM has no decoder (not an MAE checkpoint)")
        x = self.first_patch_expanding(channels_last(z))
        for layer in self.layers_up:
            x = layer(x)
        x = self.decoder_pred(self.norm_up(x))  # (B, d, h, w, T, p^3 C_in)
        b, d, h, w, t, _ = x.shape
        p = self.config.patch_size[0]
        x = x.view(b, d, h, w, t, p, p, p, self.config.in_chans).permute(0, 8, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, self.config.in_chans, d * p, h * p, w * p, t)
