"""roimae: region-aware (ROI-guided) masked autoencoder pretraining for 4D fMRI, as a BIDS-App."""

__version__ = "0.1.0"
__all__ = ["__version__"]
