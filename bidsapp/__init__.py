"""roimae: region-aware (ROI-guided) masked autoencoder pretraining for 4D fMRI, as a BIDS-App.

The Python API (:mod:`bidsapp.api`) is re-exported here and imported on first use, so that the
command line does not pay for it: ``from bidsapp import load_model, embed_img, RoimaeEmbedder``.
"""

from __future__ import annotations

from typing import Any

from bidsapp._version import __version__

_API = ("RoimaeEmbedder", "RoimaeModel", "RunEmbedding", "embed_img", "embed_imgs", "load_model")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from bidsapp import api

        return getattr(api, name)
    raise AttributeError(f"module 'bidsapp' has no attribute {name!r}")
