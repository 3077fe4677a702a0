"""edgepack: one command from a PyTorch model to mobile artifacts with 4-bit weights.

The repository's top-level exporters/ and packaging/ import as edgepack.exporters and
edgepack.packaging through pyproject's package-dir mapping (setuptools' editable finder in a
development install, the wheel's layout otherwise); nothing is mounted at import."""

__version__ = "0.1.0"
