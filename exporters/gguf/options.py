"""GGUF's own export options (its `edgepack export` flags are generated from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepack.errors import InputError
from edgepack.exporters.backend import flag

# The GGUF type of the layers the plan stores at 4 bits: Q4_1 (each block of 32 its own min..max,
# 5 bits per weight with its fp16 scale and minimum; a Q4_1 source survives unchanged) or Q4_0
# (symmetric, 4.5 bits per weight). Layers the plan keeps at 8 bits are Q8_0.
INT4_TYPES = ("Q4_1", "Q4_0")


@dataclass(frozen=True)
class Options:
    int4_type: str = field(default="Q4_1", metadata=flag(
        "--gguf-int4", "GGUF: the type of 4-bit layers: 'Q4_1' (each block of 32 its own min..max, 5 bits per "
        "weight; the default) or 'Q4_0' (symmetric, 4.5 bits per weight, less accurate). 8-bit layers are Q8_0.", str))

    def __post_init__(self):
        if self.int4_type not in INT4_TYPES:
            raise InputError(f"--gguf-int4 {self.int4_type!r} is not a GGUF 4-bit type",
                             hint=f"choose {' or '.join(INT4_TYPES)}")

    @property
    def int4_grid(self) -> str:
        return "offset" if self.int4_type == "Q4_1" else "symmetric"
