"""MNN's own export options: none yet; its int4 grid is fixed (exporters/mnn/lower.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    @property
    def int4_grid(self) -> str:
        # MNN's asymmetric blocks: each its own min..max, fp16 scale and minimum (5.0 bits a weight)
        return "offset"
