"""Shared code of the label-free microscopy bundle zoo: io, transforms, losses, networks, metrics,
segmentation, synthetic phantoms and data manifests. Imported by every bundle as ``common``."""

__version__ = "0.1.0"
