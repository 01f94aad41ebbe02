"""Upstream foundation models (SwiFT, NeuroSTORM): configurations and Lightning checkpoint import.

:class:`UpstreamConfig` holds the sizes of one upstream network, with the released configuration
as defaults (SwiFT ``sample_script.sh``, NeuroSTORM ``pt_mae_neurostorm.sh`` and the fine-tuning
scripts): 96^3 x 20 frames, patches 6x6x6x1, embedding 36, depths 2 2 6 2, heads 3 6 12 24,
windows 4x4x4x4 (stage 0 as well), ``c_multiplier`` 2 and full attention in the last stage.
These are not :class:`~bidsapp.model.presets.ModelPreset` entries: a preset describes roimae's own
masked autoencoder on its working grid, while an upstream configuration is whatever the
checkpoint's ``hyper_parameters`` say, and the network must match it exactly to load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from torch import nn

Family = Literal["swift", "neurostorm"]
Shape4 = tuple[int, int, int, int]

def _tuple(value: Any, n: int | None = None) -> tuple:
    values = tuple(value) if isinstance(value, list | tuple) else (value,) * (n or 1)
    return values


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "t", "y")
    return bool(value)


@dataclass(frozen=True)
class UpstreamConfig:
    """Sizes of one SwiFT or NeuroSTORM network; the defaults are the released configuration.

    Attributes
    ----------
    family : {"swift", "neurostorm"}
        SwiFT (window attention) or NeuroSTORM (Mamba in each window).
    img_size : tuple of int
        ``(D, H, W, T)``: the input grid and the frames the time embeddings cover.
    in_chans, embed_dim : int
        Input channels; channels of stage 0.
    window_size, first_window_size : tuple of int
        Windows ``(wd, wh, ww, wt)`` in tokens of stages 1.. and of stage 0.
    patch_size : tuple of int
        ``(pd, ph, pw, pt)`` voxels and frames per token (``pt`` = 1).
    depths, num_heads : tuple of int
        Blocks and attention heads per stage (NeuroSTORM ignores the heads).
    c_multiplier : int
        Channel factor of every patch merging.
    last_layer_full_MSA : bool
        The last stage attends over its whole spatial grid.
    mlp_ratio : float
        MLP width relative to the channels.
    qkv_bias, patch_norm : bool
        Bias of the attention's ``qkv``; a LayerNorm after the patch embedding.
    mae : bool
        NeuroSTORM's masked autoencoder (mask tokens and decoder), as its pretraining saves it.
    mask_token_layout : {"released", "latest"}
        ``released``: ``mask_token (prod(window_size), C)``; ``latest``: ``mask_token (C)``,
        ``window_mask_token`` and ``atlas_mask_token``.
    prompt_len : int
        Prompt tokens prepended to every window (NeuroSTORM's prompt tuning; 0 = none).
    d_state, d_conv, expand : int
        NeuroSTORM's Mamba sizes.
    """

    family: Family = "swift"
    img_size: Shape4 = (96, 96, 96, 20)
    in_chans: int = 1
    embed_dim: int = 36
    window_size: Shape4 = (4, 4, 4, 4)
    first_window_size: Shape4 = (4, 4, 4, 4)
    patch_size: Shape4 = (6, 6, 6, 1)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    c_multiplier: int = 2
    last_layer_full_MSA: bool = True
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_norm: bool = False
    mae: bool = False
    mask_token_layout: Literal["released", "latest"] = "released"
    prompt_len: int = 0
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2

    def __post_init__(self) -> None:
        fix = {name: tuple(int(v) for v in getattr(self, name)) for name in
               ("img_size", "window_size", "first_window_size", "patch_size", "depths", "num_heads")}
        for name, value in fix.items():
            object.__setattr__(self, name, value)
        problems = []
        if self.family not in ("swift", "neurostorm"):
            problems.append(f"unknown family {self.family!r}")
        if any(len(fix[k]) != 4 for k in ("img_size", "window_size", "first_window_size", "patch_size")):
            problems.append("img_size, window_size, first_window_size and patch_size need 4 values")
        elif self.patch_size[3] != 1 or any(
                i % p for i, p in zip(self.img_size, self.patch_size, strict=True)):
            problems.append(f"patch {self.patch_size} must tile img_size {self.img_size} with one frame each")
        elif any((i // p) % 2 ** (len(self.depths) - 1)
                 for i, p in zip(self.img_size[:3], self.patch_size[:3], strict=True)):
            problems.append(f"the token grid cannot be halved {len(self.depths) - 1} times")
        if len(self.depths) != len(self.num_heads) or not self.depths:
            problems.append("one depth and one head count per stage")
        if self.mae and (self.family != "neurostorm" or len(self.depths) != 4
                         or len(set(self.patch_size[:3])) != 1):
            problems.append("an MAE decoder needs NeuroSTORM with 4 stages and cubic patches")
        if self.mask_token_layout not in ("released", "latest"):
            problems.append(f"unknown mask token layout {self.mask_token_layout!r}")
        if problems:
            raise ValueError("upstream configuration: " + "; ".join(problems))

    def stage_dims(self) -> tuple[int, ...]:
        """Channels of every stage."""
        return tuple(self.embed_dim * self.c_multiplier**i for i in range(len(self.depths)))

    def grid_shape(self) -> tuple[int, int, int]:
        """Token grid of one frame at stage 0."""
        return tuple(i // p for i, p in zip(self.img_size[:3], self.patch_size[:3], strict=True))

    def describe(self) -> dict:
        """Plain JSON values (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_hyper_parameters(cls, family: Family, hparams: Mapping[str, Any],
                              **overrides: Any) -> UpstreamConfig:
        """The configuration an upstream ``load_model`` builds from argparse ``hparams``.

        Keys it does not hold keep the released values; ``overrides`` (e.g. ``mae``) win.
        """
        def get(name: str, default: Any) -> Any:
            value = hparams.get(name)
            return default if value is None else value

        base = cls(family=family)
        depths = _tuple(get("depths", base.depths))
        values = dict(
            img_size=_tuple(get("img_size", base.img_size), 4),
            in_chans=int(get("in_chans", base.in_chans)),
            embed_dim=int(get("embed_dim", base.embed_dim)),
            window_size=_tuple(get("window_size", base.window_size), 4),
            first_window_size=_tuple(get("first_window_size", base.first_window_size), 4),
            patch_size=_tuple(get("patch_size", base.patch_size), 4),
            depths=depths,
            num_heads=_tuple(get("num_heads", base.num_heads), len(depths)),
            c_multiplier=int(get("c_multiplier", base.c_multiplier)),
            last_layer_full_MSA=_bool(get("last_layer_full_MSA", base.last_layer_full_MSA)),
        )
        if family == "neurostorm" and _bool(hparams.get("use_prompt_tuning", False)):
            values["prompt_len"] = int(get("prompt_len", 0))
        return replace(base, **{**values, **overrides})


#: SwiFT's released encoder (``contrastive_pretrained.ckpt``).
SWIFT_RELEASED = UpstreamConfig(family="swift")
#: NeuroSTORM's released MAE (``pt_fmrifound_mae_ratio0.5.ckpt`` and siblings).
NEUROSTORM_RELEASED = UpstreamConfig(family="neurostorm", mae=True, mask_token_layout="released")


def build_upstream(config: UpstreamConfig) -> nn.Module:
    """A freshly initialised :class:`~.swift.SwiFT` or :class:`~.neurostorm.NeuroSTORM`."""
    if config.family == "swift":
        from bidsapp.model.swift import SwiFT

        return SwiFT(config)
    from bidsapp.model.neurostorm import NeuroSTORM

    return NeuroSTORM(config)
