"""Model sizes.

Every preset reads windows on the 96^3 MNI cube (2 mm); ``downsample = s`` average-pools them to
a working grid of ``96/s`` voxels per side, where masks and losses live. Tokens are ``p^3``
working voxels of one frame. Stage ``i`` has ``dim * 2**i`` channels on a grid halved ``i``
times in space (time is never merged). Parameter counts are of the whole masked autoencoder
(encoder with patch embedding and mask token, plus the light decoder), as
:func:`bidsapp.model.factory.count_parameters` gives them; they are checked by the test suite.

=====  ==========  =====  ============  ================  ==========  ============  =========
name   working     patch  tokens/frame  dims              depths      heads         params
=====  ==========  =====  ============  ================  ==========  ============  =========
tiny   48^3 (s=2)  4      12^3          16, 32, 64        2, 2, 2     1, 2, 4       213,856
small  96^3 (s=1)  6      16^3          24, 48, 96, 192   2, 2, 2, 2  2, 4, 8, 16   1,722,984
base   96^3 (s=1)  6      16^3          36, 72, 144, 288  2, 2, 6, 2  3, 6, 12, 24  4,758,768
=====  ==========  =====  ============  ================  ==========  ============  =========

``base`` is the NeuroSTORM configuration (windows 4x4x4x4, MLP ratio 4). ``small`` keeps its grid
and windows at two thirds of the width with a shallower third stage, for a modest GPU.
``tiny`` is for the CPU demo: a 48^3 working grid, windows 3x3x3x4 (which tile the 12^3, 6^3 and
3^3 stage grids without padding) and two blocks per stage (plain and shifted windows).

Each size also exists with the ``vit4d`` backbone (``--backbone vit4d --preset NAME``): a plain
vision transformer (:mod:`bidsapp.model.vit4d`) on the same working grid and token grid, so the
same masks apply. Its tokens are tubelets of ``p^3`` voxels and ``tt`` frames (as facebookresearch
mae_st); the window length must be a multiple of ``tt``. The encoder sees only the visible brain
tokens, with global attention; the decoder (dim, depth, heads) sees every brain token.

============  ==========  =====  ==  ===  =====  =====  ===========  =========
vit4d         working     patch  tt  dim  depth  heads  decoder      params
============  ==========  =====  ==  ===  =====  =====  ===========  =========
vit4d-tiny    48^3 (s=2)  4      5   64   3      4      32, 1, 2     216,544
vit4d-small   96^3 (s=1)  6      5   128  7      4      64, 2, 4     1,843,384
vit4d-base    96^3 (s=1)  6      5   192  9      6      96, 2, 4     4,766,328
============  ==========  =====  ==  ===  =====  =====  ===========  =========

Global attention costs ``N^2`` in the number ``N`` of tokens, where swin4d's windows cost ``N``.
Tubelets of 5 frames (10 s at TR 2 s; the default 20-frame windows hold 4) keep ``N`` small: at 50%
roi masking the encoder sees about 20% of the cube's tokens, some 1,500 per window for
``vit4d-tiny`` and 3,300 for ``small`` and ``base`` (2-frame tubelets, as mae_st, would make
attention 6 times as costly).

The released SwiFT and NeuroSTORM networks (:mod:`bidsapp.model.upstream_mae`) have one preset
each, ``released`` (:data:`UPSTREAM_PRESETS`, also in ``BACKBONE_PRESETS``): ``base``'s sizes on
the 96^3 cube, which is what their checkpoints hold. A model imported with ``roimae import-model``
is named ``released`` too, but its network is the one its checkpoint's ``hyper_parameters``
describe (the sidecar's ``upstream.config``), whatever its sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from bidsapp.grid import CUBE_SHAPE

Backbone = Literal["swin4d", "vit4d", "swift", "neurostorm"]


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of one masked autoencoder.

    Attributes
    ----------
    name : str
        The size: tiny, small or base (one preset of each size per backbone).
    downsample : int
        Average-pooling factor from the 96^3 input cube to the working grid.
    patch_size : int
        Token edge ``p`` in working voxels (a token is ``p x p x p`` voxels of ``tubelet`` frames).
    embed_dim : int
        Channels of stage 0; doubled at every stage.
    depths, num_heads : tuple of int
        Transformer blocks and attention heads per stage (vit4d: one stage).
    window_size : tuple of int or None
        swin4d: attention window ``(wd, wh, ww, wt)`` in tokens (clamped to smaller grids);
        None for vit4d (global attention).
    mlp_ratio : float
        Hidden width of the block MLPs relative to the channels.
    backbone : {"swin4d", "vit4d", "swift", "neurostorm"}
        The encoder architecture (swift and neurostorm: the upstream networks,
        :mod:`bidsapp.model.upstream_mae`).
    tubelet : int
        Frames per token (vit4d; 1 for swin4d).
    decoder_dim, decoder_depth, decoder_heads : int
        The transformer decoder of vit4d; 0 for swin4d (whose decoder is linear upsampling).
    """

    name: str
    downsample: int
    patch_size: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: tuple[int, int, int, int] | None = None
    mlp_ratio: float = 4.0
    backbone: Backbone = "swin4d"
    tubelet: int = 1
    decoder_dim: int = 0
    decoder_depth: int = 0
    decoder_heads: int = 0

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"preset {self.name}: one depth and one head count per stage")
        if any(size % self.downsample for size in CUBE_SHAPE):
            raise ValueError(f"preset {self.name}: 96 is not divisible by {self.downsample}")
        if any(size % self.patch_size for size in self.working_shape()):
            raise ValueError(f"preset {self.name}: patch {self.patch_size} does not tile the grid")
        merges = 2 ** (len(self.depths) - 1)
        if any(g % merges for g in self.grid_shape()):
            raise ValueError(f"preset {self.name}: grid cannot be halved {len(self.depths) - 1}x")
        decoder = (self.decoder_dim, self.decoder_depth, self.decoder_heads)
        if self.backbone == "swin4d":
            if self.window_size is None or self.tubelet != 1 or any(decoder):
                raise ValueError(f"preset {self.name}: swin4d needs a window, tubelet 1 and no "
                                 "transformer decoder")
        elif self.backbone == "vit4d":
            # Sine-cosine positional embeddings: a quarter of the channels per axis (t, d, h, w).
            if (len(self.depths) != 1 or self.window_size is not None or not all(decoder)
                    or self.embed_dim % 8 or self.decoder_dim % 8):
                raise ValueError(f"preset {self.name}: vit4d needs one stage, no window, a "
                                 "decoder and dims divisible by 8")
        elif self.backbone in ("swift", "neurostorm"):
            # The upstream networks read the 96^3 cube itself, one frame per token.
            if (self.window_size is None or self.tubelet != 1 or any(decoder)
                    or self.downsample != 1):
                raise ValueError(f"preset {self.name}: {self.backbone} needs a window, tubelet 1, "
                                 "downsample 1 and no transformer decoder")
        else:
            raise ValueError(f"preset {self.name}: unknown backbone {self.backbone!r}")

    def working_shape(self) -> tuple[int, int, int]:
        """Working grid ``(D, H, W)`` in voxels."""
        return tuple(size // self.downsample for size in CUBE_SHAPE)

    def grid_shape(self) -> tuple[int, int, int]:
        """Token grid ``(gd, gh, gw)`` of one frame (of one tubelet for vit4d)."""
        return tuple(size // self.patch_size for size in self.working_shape())

    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each stage."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @property
    def n_features(self) -> int:
        """Size of a window embedding: the channels of the last stage (vit4d has one stage)."""
        return self.stage_dims()[-1]

    def stage_grids(self) -> tuple[tuple[int, int, int], ...]:
        """Token grid of each stage (space halved at every merge)."""
        return tuple(
            tuple(g // 2**i for g in self.grid_shape()) for i in range(len(self.depths))
        )

    def describe(self) -> dict:
        """Settings and shapes as plain JSON values.

        :func:`bidsapp.model.factory.describe_model` adds the parameter count (checkpoint sidecar).
        """
        info = asdict(self)
        info.update(
            input_shape=list(CUBE_SHAPE),
            working_shape=list(self.working_shape()),
            grid_shape=list(self.grid_shape()),
            stage_dims=list(self.stage_dims()),
        )
        return {k: list(v) if isinstance(v, tuple) else v for k, v in info.items()}


#: The swin4d presets (the default backbone), by size.
PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="tiny", downsample=2, patch_size=4, embed_dim=16, depths=(2, 2, 2),
            num_heads=(1, 2, 4), window_size=(3, 3, 3, 4),
        ),
        ModelPreset(
            name="small", downsample=1, patch_size=6, embed_dim=24, depths=(2, 2, 2, 2),
            num_heads=(2, 4, 8, 16), window_size=(4, 4, 4, 4),
        ),
        ModelPreset(
            name="base", downsample=1, patch_size=6, embed_dim=36, depths=(2, 2, 6, 2),
            num_heads=(3, 6, 12, 24), window_size=(4, 4, 4, 4),
        ),
    )
}

#: The vit4d presets, by size: the grids of the swin4d preset of the same name.
VIT4D_PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="tiny", backbone="vit4d", downsample=2, patch_size=4, tubelet=5, embed_dim=64,
            depths=(3,), num_heads=(4,), decoder_dim=32, decoder_depth=1, decoder_heads=2,
        ),
        ModelPreset(
            name="small", backbone="vit4d", downsample=1, patch_size=6, tubelet=5, embed_dim=128,
            depths=(7,), num_heads=(4,), decoder_dim=64, decoder_depth=2, decoder_heads=4,
        ),
        ModelPreset(
            name="base", backbone="vit4d", downsample=1, patch_size=6, tubelet=5, embed_dim=192,
            depths=(9,), num_heads=(6,), decoder_dim=96, decoder_depth=2, decoder_heads=4,
        ),
    )
}

#: The backbones of the upstream networks (their checkpoints are imported, not pretrained from
#: nothing by default).
UPSTREAM_BACKBONES = ("swift", "neurostorm")

#: The released upstream networks (:mod:`bidsapp.model.upstream_mae`), by backbone: 96^3 cube,
#: patches 6^3, base's widths, depths and 4x4x4x4 windows (heads unused by NeuroSTORM).
UPSTREAM_PRESETS: dict[str, ModelPreset] = {
    backbone: ModelPreset(
        name="released", backbone=backbone, downsample=1, patch_size=6, embed_dim=36,
        depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=(4, 4, 4, 4),
    )
    for backbone in UPSTREAM_BACKBONES
}

#: Every preset: ``BACKBONE_PRESETS[backbone][size]`` (the upstream backbones: ``released``).
BACKBONE_PRESETS: dict[str, dict[str, ModelPreset]] = {
    "swin4d": PRESETS, "vit4d": VIT4D_PRESETS,
    **{backbone: {"released": preset} for backbone, preset in UPSTREAM_PRESETS.items()},
}
