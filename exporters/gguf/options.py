"""GGUF's own export options (its `edgepack export` flags are generated from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepack.errors import InputError
from edgepack.exporters.backend import flag

# What the file stores. Q4_1 and Q4_0 follow edgepack's precision plan: its 4-bit layers in that
# type (Q4_1: each block of 32 its own min..max, 5 bits per weight with the fp16 scale and minimum,
# so a Q4_1 source survives unchanged; Q4_0: symmetric, 4.5 bits), its 8-bit layers Q8_0.
# Q4_K_M is llama.cpp's own mix, chosen tensor by tensor by llama.cpp's quantizer (no plan).
TYPES = ("Q4_1", "Q4_0", "Q4_K_M")
LLAMA_CPP_MIXES = {"Q4_K_M": "MOSTLY_Q4_K_M"}  # type -> the llama_ftype llama.cpp's quantizer makes


@dataclass(frozen=True)
class Options:
    type: str = field(default="Q4_1", metadata=flag(
        "--gguf-type", "GGUF: what the file stores at --quant int4. 'Q4_1' (the default: the precision plan's 4-bit "
        "layers in blocks of 32 with their own min..max, 5 bits per weight; its 8-bit layers Q8_0), 'Q4_0' (the "
        "same, symmetric, 4.5 bits per weight, less accurate) or 'Q4_K_M' (llama.cpp's own mix, made by llama.cpp's "
        "quantizer from the full-precision weights; it chooses each tensor's type, the plan does not apply).", str))

    def __post_init__(self):
        if self.type not in TYPES:
            raise InputError(f"--gguf-type {self.type!r} is not a type edgepack writes",
                             hint=f"choose {', '.join(TYPES)}")

    @property
    def int4_grid(self) -> str | None:
        """The precision plan's grid, or None where llama.cpp's quantizer chooses instead."""
        return {"Q4_1": "offset", "Q4_0": "symmetric"}.get(self.type)
