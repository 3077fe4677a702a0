"""What each kind of artifact says about itself, read back from the file (for `edgepack inspect`):
one reader per backend, imported lazily; a backend without one contributes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def tflite_metadata(path: Path) -> list[tuple[str, str]]:
    """The tflite-support model metadata and associated files packed inside the .tflite."""
    from edgepack.packaging.tflite_metadata import describe

    return describe(path.read_bytes())


READERS: dict[str, Callable[[Path], list[tuple[str, str]]]] = {
    "tflite": tflite_metadata,
}


def embedded_metadata(bundle: Path, artifact: dict) -> list[tuple[str, str]]:
    reader = READERS.get(artifact["backend"])
    path = bundle / artifact["path"]
    return reader(path) if reader and path.exists() else []
