"""The masked autoencoder: masking strategies, the Swin4D and ViT4D backbones and model presets.

Import from the modules: ``factory`` (``build_model``), ``masking``, ``presets``, ``swin4d``,
``vit4d``, ``mae`` and ``layers``; the package re-exports nothing.
"""
