"""SwiFT and NeuroSTORM behind roimae's :class:`~bidsapp.model.mae.MaskedAutoencoder` interface.

The upstream networks (:mod:`bidsapp.model.swift`, :mod:`bidsapp.model.neurostorm`) take
``(B, 1, D, H, W, T)`` on the 96^3 cube, which is roimae's cube (NeuroSTORM's ``select_middle_96``
and ``pad_to_96`` of the MNI 2 mm grid, :mod:`bidsapp.grid`) with time last; roimae's windows
``(B, T, D, H, W)`` at ``downsample`` 1 are permuted to it, nothing else.

- ``neurostorm`` (:class:`NeuroSTORMAutoencoder`): NeuroSTORM's MAE. Hidden voxels are zeroed in
  the input (one channel: no hidden-voxel indicator, unlike swin4d), then the tokens the mask hides
  are replaced by NeuroSTORM's mask token after the patch embedding, as its pretraining does
  (by default its window mask token, the one both checkpoint layouts hold: a hidden token gets
  the token of its position in its 4x4x4x4 window); its decoder gives the reconstruction.
- ``swift`` (:class:`SwiFTEncoder`): an encoder only. It has no decoder, so :meth:`forward`
  (pretraining, attribution's reconstructions) raises a :class:`~bidsapp.errors.UsageError`; it
  has no mask token either, so hidden voxels are only zeroed in its input (occlusion).

Embeddings are as swin4d's: the window embedding is the mean of the last stage's features over
all frames and the last-stage tokens holding brain (at the released size every 48^3 token does);
token features (:meth:`~bidsapp.model.mae.MaskedAutoencoder.encode_tokens`) are stage 0's blocks'
output on the 16^3 token grid, before its patch merging, every token valid.

Inputs: the released weights were trained on runs z-scored over brain voxels and frames (as
roimae's cache) whose background, after the z-scoring, holds the run's smallest brain value (the
padding of ``pad_to_96`` too), not 0. ``background="min"`` (the default) fills the voxels outside
``brain`` with the window's smallest brain value, the closest roimae can get per window; ``"zero"``
keeps roimae's 0.

Build one with :func:`bidsapp.model.factory.build_model` and
:data:`~bidsapp.model.presets.UPSTREAM_PRESETS` (fresh weights, 20 frames), or import a Lightning
checkpoint with :meth:`UpstreamAutoencoder.from_lightning`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from bidsapp.errors import UsageError
from bidsapp.model.layers import brain_tokens
from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.masking import Mask
from bidsapp.model.neurostorm import MaskTokenKind, NeuroSTORM
from bidsapp.model.presets import ModelPreset
from bidsapp.model.swift import SwiFT, channels_first
from bidsapp.model.upstream import (
    NEUROSTORM_RELEASED,
    SWIFT_RELEASED,
    UpstreamConfig,
    read_lightning_checkpoint,
)

Background = Literal["min", "zero"]


def preset_for(config: UpstreamConfig) -> ModelPreset:
    """The :class:`ModelPreset` of an upstream configuration on roimae's 96^3 cube.

    Raises
    ------
    ValueError
        If the network does not read the 96^3 cube with cubic patches and doubling channels.
    """
    if (config.img_size[:3] != (96, 96, 96) or len(set(config.patch_size[:3])) != 1
            or config.c_multiplier != 2 or config.in_chans != 1):
        raise ValueError(f"a {config.family} network on roimae's cube needs img_size 96^3, cubic "
                         "patches, c_multiplier 2 and one input channel")
    return ModelPreset(name="released", backbone=config.family, downsample=1,
                       patch_size=config.patch_size[0], embed_dim=config.embed_dim,
                       depths=config.depths, num_heads=config.num_heads,
                       window_size=config.window_size)


def _config_for(preset: ModelPreset, family: str) -> UpstreamConfig:
    """The released configuration at the sizes of ``preset``."""
    base = SWIFT_RELEASED if family == "swift" else NEUROSTORM_RELEASED
    p = preset.patch_size
    return replace(base, patch_size=(p, p, p, 1), embed_dim=preset.embed_dim, depths=preset.depths,
                   num_heads=preset.num_heads, window_size=preset.window_size,
                   first_window_size=preset.window_size)


class UpstreamAutoencoder(MaskedAutoencoder):
    """What both adapters share: the input conversion, the pooled embedding, token features.

    Parameters
    ----------
    preset : ModelPreset
        ``backbone`` "swift" or "neurostorm" (:data:`~bidsapp.model.presets.UPSTREAM_PRESETS`).
    norm_pix_loss : bool
        As :class:`~bidsapp.model.mae.MaskedAutoencoder`.
    upstream : UpstreamConfig, optional
        The exact network (a checkpoint's); by default the released one at the preset's sizes.
    background : {"min", "zero"}
        Value of the voxels outside the brain (see the module docstring).
    """

    family: str

    def __init__(self, preset: ModelPreset, *, norm_pix_loss: bool = False,
                 upstream: UpstreamConfig | None = None, background: Background = "min"):
        super().__init__(preset, norm_pix_loss=norm_pix_loss)
        config = upstream or _config_for(preset, self.family)
        if config.family != self.family or replace(preset_for(config), name=preset.name) != preset:
            raise ValueError(f"the {config.family} configuration does not fit preset {preset.name!r} "
                             f"({preset.backbone})")
        if background not in ("min", "zero"):
            raise ValueError(f"background must be 'min' or 'zero'; got {background!r}")
        self.background = background
        self.net = self._network(config)

    def _network(self, config: UpstreamConfig) -> SwiFT | NeuroSTORM:
        raise NotImplementedError

    @classmethod
    def from_lightning(cls, path: str | Path, **kwargs) -> UpstreamAutoencoder:
        """Import an upstream PyTorch Lightning checkpoint (:func:`~.upstream.read_lightning_checkpoint`).

        Raises
        ------
        UpstreamCheckpointError
            As the reader; also (exit 65) for a network that does not read roimae's cube.
        """
        from bidsapp.model.upstream import UpstreamCheckpointError

        imported = read_lightning_checkpoint(path, cls.family)
        try:
            model = cls(preset_for(imported.config), upstream=imported.config, **kwargs)
        except ValueError as exc:
            raise UpstreamCheckpointError(f"{path}: {exc}") from None
        model.net.load_state_dict(imported.model.state_dict(), strict=True)
        return model.eval()

    def _input(self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """Working-resolution ``x (B, T, D, H, W)`` -> upstream's ``(B, 1, D, H, W, T)``.

        Hidden voxels are zeroed; with ``background="min"`` voxels outside ``brain`` take the
        window's smallest brain value.
        """
        if self.background == "min":
            inside = brain[:, None].expand_as(x)
            low = x.masked_fill(~inside, float("inf")).amin((1, 2, 3, 4), keepdim=True)
            low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))  # no brain: 0
            x = torch.where(inside, x, low)
        if mask is not None:
            x = x.masked_fill(self.hidden_voxels(x, mask), 0.0)
        return x.permute(0, 2, 3, 4, 1)[:, None]

    def _tokens(self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """Patch embedding, hidden tokens replaced where the network has a mask token."""
        return self.net.embed(self._input(x, brain, mask))

    def _pool(self, last: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """Mean of the last stage ``(B, d, h, w, T, C)`` over frames and brain tokens: ``(B, C)``."""
        factor = self.preset.patch_size * 2 ** (len(self.preset.depths) - 1)
        keep = brain_tokens(brain, factor)[..., None, None].to(last.dtype)  # (B, d, h, w, 1, 1)
        total = (last * keep).sum((1, 2, 3, 4))
        count = keep.sum((1, 2, 3, 4)) * last.shape[4]
        return total / count.clamp_min(1.0)

    def _embed(self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        return self._pool(self.net.run_layers(self._tokens(x, brain, mask))[-1], brain)

    def _embed_tokens(
        self, x: torch.Tensor, brain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first, outputs = self.net.features(self._tokens(x, brain, None))
        tokens = first.permute(0, 4, 1, 2, 3, 5)  # (B, T, gd, gh, gw, C0)
        valid = torch.ones(first.shape[:4], dtype=torch.bool, device=first.device)
        return self._pool(outputs[-1], brain), tokens, valid


class NeuroSTORMAutoencoder(UpstreamAutoencoder):
    """NeuroSTORM's MAE as a roimae masked autoencoder (see the module docstring).

    ``mask_token`` picks NeuroSTORM's mask token for hidden tokens: "window" (default; both
    checkpoint layouts), or with the latest layout "token" or "atlas".
    """

    family = "neurostorm"
    mask_token: MaskTokenKind = "window"

    def _network(self, config: UpstreamConfig) -> NeuroSTORM:
        if not config.mae:
            config = replace(config, mae=True)  # a fine-tuned encoder gets a fresh decoder
        return NeuroSTORM(config)

    @classmethod
    def from_lightning(cls, path: str | Path, **kwargs) -> NeuroSTORMAutoencoder:
        """Import NeuroSTORM's MAE checkpoint (its encoder, mask tokens and decoder)."""
        from bidsapp.model.upstream import UpstreamCheckpointError

        imported = read_lightning_checkpoint(path, cls.family)
        if not imported.config.mae:
            raise UpstreamCheckpointError(f"{path}: a NeuroSTORM encoder without its MAE decoder "
                                          "(a fine-tuned model): read it with read_lightning_checkpoint")
        return super().from_lightning(path, **kwargs)

    def _tokens(self, x: torch.Tensor, brain: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        hidden = None if mask is None else mask.tokens.permute(0, 2, 3, 4, 1)  # (B, gd, gh, gw, Tm)
        return self.net.masked_tokens(self._input(x, brain, mask), hidden, self.mask_token)

    def _reconstruct(
        self, x: torch.Tensor, brain: torch.Tensor, mask: Mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        last = self.net.run_layers(self._tokens(x, brain, mask))[-1]
        pred = self.net.decode(channels_first(last))[:, 0].permute(0, 4, 1, 2, 3)  # (B, T, D, H, W)
        return pred, self._pool(last, brain)


class SwiFTEncoder(UpstreamAutoencoder):
    """SwiFT's encoder as a roimae model: embeddings only (see the module docstring)."""

    family = "swift"
    has_decoder = False
    no_decoder_reason = ("the swift model is SwiFT's encoder, which has no decoder: it cannot "
                         "reconstruct hidden voxels, so no reconstruction error is measured")

    def _network(self, config: UpstreamConfig) -> SwiFT:
        return SwiFT(config)

    def _reconstruct(
        self, x: torch.Tensor, brain: torch.Tensor, mask: Mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise UsageError("swift has no decoder: it cannot be pretrained or reconstruct hidden "
                         "voxels (attribution); use it for embeddings, or use neurostorm")
