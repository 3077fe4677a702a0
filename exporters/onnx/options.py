"""ONNX's own export options (its `edgepack export` flags are generated from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepack.errors import InputError
from edgepack.exporters.backend import INT4_GRIDS, flag

# offset: stored as MatMulNBits' symmetric codes plus one int8 offset per block (a float32 scale
# per row) added by a small side product; symmetric: onnxruntime's own grid (round to nearest
# from each block's largest weight), faster and less accurate, so the precision plan keeps more
# layers int8 on it.


@dataclass(frozen=True)
class Options:
    grid: str = field(default="offset", metadata=flag(
        "--onnx-grid", "ONNX: the int4 grid: 'offset' (each block its own min..max, +1 int8 offset per 32 weights; "
        "the default) or 'symmetric' (onnxruntime's own grid, as its model builder "
        "rounds: faster decode, less accurate; the precision plan keeps more layers int8 on it).", str))

    def __post_init__(self):
        if self.grid not in INT4_GRIDS:
            raise InputError(f"--onnx-grid {self.grid!r} is not a grid", hint=f"choose {' or '.join(INT4_GRIDS)}")

    @property
    def int4_grid(self) -> str:
        return self.grid
