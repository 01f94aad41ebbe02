"""Model sizes.

Every preset reads windows on the 96^3 MNI cube (2 mm); ``downsample = s`` average-pools them to
a working grid of ``96/s`` voxels per side, where masks and losses live. Tokens are ``p^3``
working voxels of one frame. Stage ``i`` has ``dim * 2**i`` channels on a grid halved ``i``
times in space (time is never merged). Parameter counts are of the whole masked autoencoder
(encoder with patch embedding and mask token, plus the light decoder); they are checked by the
test suite.

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Shape of the input cube (2 mm MNI voxels) every preset reads.
INPUT_SHAPE = (96, 96, 96)


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of one masked autoencoder.

    Attributes
    ----------
    name : str
    downsample : int
        Average-pooling factor from the 96^3 input cube to the working grid.
    patch_size : int
        Token edge ``p`` in working voxels (a token is ``p x p x p x 1`` frame).
    embed_dim : int
        Channels of stage 0; doubled at every stage.
    depths, num_heads : tuple of int
        Swin blocks and attention heads per stage.
    window_size : tuple of int
        Attention window ``(wd, wh, ww, wt)`` in tokens (clamped to smaller grids).
    mlp_ratio : float
        Hidden width of the block MLPs relative to the channels.
    """

    name: str
    downsample: int
    patch_size: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: tuple[int, int, int, int]
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"preset {self.name}: one depth and one head count per stage")
        if any(size % self.downsample for size in INPUT_SHAPE):
            raise ValueError(f"preset {self.name}: 96 is not divisible by {self.downsample}")
        if any(size % self.patch_size for size in self.working_shape()):
            raise ValueError(f"preset {self.name}: patch {self.patch_size} does not tile the grid")
        merges = 2 ** (len(self.depths) - 1)
        if any(g % merges for g in self.grid_shape()):
            raise ValueError(f"preset {self.name}: grid cannot be halved {len(self.depths) - 1}x")

    def working_shape(self) -> tuple[int, int, int]:
        """Working grid ``(D, H, W)`` in voxels."""
        return tuple(size // self.downsample for size in INPUT_SHAPE)

    def grid_shape(self) -> tuple[int, int, int]:
        """Token grid ``(gd, gh, gw)`` of one frame."""
        return tuple(size // self.patch_size for size in self.working_shape())

    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each stage."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    def stage_grids(self) -> tuple[tuple[int, int, int], ...]:
        """Token grid of each stage (space halved at every merge)."""
        return tuple(
            tuple(g // 2**i for g in self.grid_shape()) for i in range(len(self.depths))
        )

    def describe(self) -> dict:
        """Settings, shapes and parameter count as plain JSON values (docs, checkpoint sidecar)."""
        # Imported here: the model module imports this one.
        from bidsapp.model.mae import count_parameters

        info = asdict(self)
        info.update(
            input_shape=list(INPUT_SHAPE),
            working_shape=list(self.working_shape()),
            grid_shape=list(self.grid_shape()),
            stage_dims=list(self.stage_dims()),
            n_parameters=count_parameters(self),
        )
        return {k: list(v) if isinstance(v, tuple) else v for k, v in info.items()}


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
