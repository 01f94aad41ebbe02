"""The masked autoencoder: masking strategies, the Swin4D and ViT4D backbones and model presets."""

from bidsapp.model.factory import build_model, count_parameters, describe_model
from bidsapp.model.mae import MAEOutput, MaskedAutoencoder
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
from bidsapp.model.presets import BACKBONE_PRESETS, PRESETS, VIT4D_PRESETS, ModelPreset
from bidsapp.model.swin4d import Swin4DEncoder, SwinMaskedAutoencoder
from bidsapp.model.vit4d import ViTMaskedAutoencoder

__all__ = [
    "BACKBONE_PRESETS",
    "PRESETS",
    "VIT4D_PRESETS",
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
    "SwinMaskedAutoencoder",
    "ViTMaskedAutoencoder",
    "build_masking",
    "build_model",
    "count_parameters",
    "describe_model",
]
