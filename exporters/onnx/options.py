"""ONNX's own export options: none yet; the shared QuantSpec says everything."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    pass
