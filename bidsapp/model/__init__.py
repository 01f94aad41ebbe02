"""The masked autoencoder: masking strategies, the Swin4D backbone and model presets."""

from bidsapp.model.mae import MAEOutput, MaskedAutoencoder, count_parameters
from bidsapp.model.masking import (
    BrainRandomMasking,
    Mask,
    MaskingStrategy,
    RandomMasking,
    RegionGrid,
    RegionMasking,
    RegionVoxelMasking,
    build_masking,
)
from bidsapp.model.presets import INPUT_SHAPE, PRESETS, ModelPreset
from bidsapp.model.swin4d import Swin4DEncoder

__all__ = [
    "INPUT_SHAPE",
    "PRESETS",
    "BrainRandomMasking",
    "MAEOutput",
    "Mask",
    "MaskedAutoencoder",
    "MaskingStrategy",
    "ModelPreset",
    "RandomMasking",
    "RegionGrid",
    "RegionMasking",
    "RegionVoxelMasking",
    "Swin4DEncoder",
    "build_masking",
    "count_parameters",
]
