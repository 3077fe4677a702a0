"""CoreML's own export options (its `edgepack export` flags are generated from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepack.errors import InputError
from edgepack.exporters.backend import INT4_GRIDS, flag

IOS_TARGETS = (17, 18)
PRECISIONS = ("fp16", "fp32")
COMPRESSIONS = ("int4", "palettize4")


@dataclass(frozen=True)
class Options:
    ios_target: int = field(default=18, metadata=flag(
        "--ios-target", "CoreML: minimum iOS version, 17 or 18 (default 18: KV-cache state and int4 per-block "
        "weights need 18).", int))
    precision: str = field(default="fp16", metadata=flag(
        "--coreml-precision", "CoreML: compute precision, fp16 (default) or fp32.", str))
    # None: int4 when --quant int4 (int8 per-channel for int8)
    compression: str | None = field(default=None, metadata=flag(
        "--coreml-compression", "CoreML: int4 (linear per-block, the default for --quant int4) or palettize4 "
        "(4-bit lookup tables, preferred by the Neural Engine).", str))
    grid: str = field(default="offset", metadata=flag(
        "--coreml-grid", "CoreML: the grid of int4 blocks: 'offset' (each block its own min..max, a float "
        "offset beside each scale; the default) or 'symmetric' (coremltools' linear_symmetric: -7..7, smaller).", str))

    def __post_init__(self):
        if self.ios_target not in IOS_TARGETS:
            raise InputError(f"--ios-target {self.ios_target} is not supported",
                             hint=f"choose one of {', '.join(map(str, IOS_TARGETS))}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--coreml-precision {self.precision!r} is not a precision",
                             hint=f"choose one of {', '.join(PRECISIONS)}")
        if self.grid not in INT4_GRIDS:
            raise InputError(f"--coreml-grid {self.grid!r} is not a grid", hint=f"choose {' or '.join(INT4_GRIDS)}")
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise InputError(f"--coreml-compression {self.compression!r} is not a compression",
                             hint=f"choose one of {', '.join(COMPRESSIONS)}")

    @property
    def int4_grid(self) -> str:
        """A 4-bit palette has no grid; its 16 fp16 entries per layer cost about the symmetric grid's bits."""
        return "symmetric" if self.compression == "palettize4" else self.grid
