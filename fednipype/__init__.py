"""fednipype: privacy-preserving analysis as a step of a neuroimaging pipeline."""

from fednipype._version import __version__

__all__ = ["__version__"]
