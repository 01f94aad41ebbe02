"""Build the masked autoencoder of a preset: the one place that knows every backbone."""

from __future__ import annotations

import torch

from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.presets import ModelPreset
from bidsapp.model.swin4d import SwinMaskedAutoencoder
from bidsapp.model.upstream import UpstreamConfig
from bidsapp.model.upstream_mae import Background, NeuroSTORMAutoencoder, SwiFTEncoder, preset_for
from bidsapp.model.vit4d import ViTMaskedAutoencoder

#: The masked autoencoder class of each backbone (``ModelPreset.backbone``); swift and neurostorm
#: are the upstream networks (presets in :data:`~bidsapp.model.presets.UPSTREAM_PRESETS`).
BACKBONES: dict[str, type[MaskedAutoencoder]] = {
    "swin4d": SwinMaskedAutoencoder,
    "vit4d": ViTMaskedAutoencoder,
    "swift": SwiFTEncoder,
    "neurostorm": NeuroSTORMAutoencoder,
}


def build_model(preset: ModelPreset, *, norm_pix_loss: bool = False) -> MaskedAutoencoder:
    """Build the masked autoencoder of a preset, with freshly initialised weights.

    Parameters
    ----------
    preset : ModelPreset
        Backbone and sizes (see :mod:`bidsapp.model.presets`); ``preset.backbone`` picks the class.
    norm_pix_loss : bool, default False
        Reconstruct every token of every frame standardised over its brain voxels (MAE's
        ``norm_pix_loss``).

    Returns
    -------
    MaskedAutoencoder
        A :class:`~bidsapp.model.swin4d.SwinMaskedAutoencoder`, a
        :class:`~bidsapp.model.vit4d.ViTMaskedAutoencoder` or an upstream network
        (:mod:`bidsapp.model.upstream_mae`), in training mode on the current default device.

    Raises
    ------
    ValueError
        If ``preset.backbone`` names no known backbone.

    Examples
    --------
    >>> from bidsapp.model.presets import PRESETS
    >>> model = build_model(PRESETS["tiny"])
    >>> type(model).__name__
    'SwinMaskedAutoencoder'
    """
    try:
        cls = BACKBONES[preset.backbone]
    except KeyError:
        raise ValueError(f"unknown backbone {preset.backbone!r}; choose one of "
                         f"{', '.join(BACKBONES)}") from None
    return cls(preset, norm_pix_loss=norm_pix_loss)


def build_upstream_model(config: UpstreamConfig, *, norm_pix_loss: bool = False,
                         background: Background = "min") -> MaskedAutoencoder:
    """The masked autoencoder of an exact upstream network (an imported checkpoint's), fresh weights.

    Parameters
    ----------
    config : UpstreamConfig
        The SwiFT or NeuroSTORM network, on roimae's 96^3 cube.
    norm_pix_loss : bool, default False
        As :func:`build_model`.
    background : {"min", "zero"}
        The value of voxels outside the brain (:mod:`bidsapp.model.upstream_mae`).

    Raises
    ------
    ValueError
        If the network does not read the 96^3 cube (:func:`~.upstream_mae.preset_for`).
    """
    cls = BACKBONES[config.family]
    return cls(preset_for(config), norm_pix_loss=norm_pix_loss, upstream=config, background=background)


def count_parameters(preset: ModelPreset) -> int:
    """Number of trainable parameters of the masked autoencoder of ``preset``."""
    # The meta device gives shapes without allocating or initialising memory.
    with torch.device("meta"):
        model = build_model(preset)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_model(preset: ModelPreset) -> dict:
    """The preset's description with its parameter count, as plain JSON values.

    :meth:`ModelPreset.describe <bidsapp.model.presets.ModelPreset.describe>` and
    ``n_parameters`` (docs, checkpoint sidecar).
    """
    return {**preset.describe(), "n_parameters": count_parameters(preset)}
