"""The version of roimae: its own module, so that no module imports the package front for it."""

__version__ = "0.1.0"
