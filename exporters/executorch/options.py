"""ExecuTorch's own export options (its `edgepack export` flags are generated from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepack.errors import InputError
from edgepack.exporters.backend import INT4_GRIDS, flag


@dataclass(frozen=True)
class Options:
    grid: str = field(default="offset", metadata=flag(
        "--executorch-grid", "ExecuTorch: the int4 grid: 'offset' (each block its own min..max, as a Q4_1 "
        "GGUF holds it: XNNPACK's symmetric blocks plus each input block's mean through a small int8 offsets "
        "layer; the default) or 'symmetric' (export_llm's 8da4w grid, each block's scale searched: smaller and "
        "faster, less accurate; on the real SmolLM2-135M 94.0 MB at +62 % perplexity, export_llm's own +65 %, "
        "against 99.2 MB at +7.1 %, docs/quantization.md).", str))

    def __post_init__(self):
        if self.grid not in INT4_GRIDS:
            raise InputError(f"--executorch-grid {self.grid!r} is not a grid", hint=f"choose {' or '.join(INT4_GRIDS)}")

    @property
    def int4_grid(self) -> str:
        return self.grid
