"""TFLite's own export options (its `edgepack export` flags are generated from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepack.errors import InputError
from edgepack.exporters.backend import flag

DEFAULT_PREFILL_LEN = 128
BUNDLES = ("litertlm",)


@dataclass(frozen=True)
class Options:
    """prefill_lens: one prefill_<N> signature per length (default: min(128, max_seq_len - 1));
    bundle: also write a LiteRT-LM bundle ('litertlm')."""

    prefill_lens: tuple[int, ...] | None = field(default=None, metadata=flag(
        "--prefill-len", "TFLite: a prefill signature's fixed prompt length; repeat for several.", int, multiple=True))
    bundle: str | None = field(default=None, metadata=flag(
        "--tflite-bundle", "TFLite: also write a LiteRT-LM bundle ('litertlm').", str))

    def __post_init__(self):
        if self.prefill_lens is not None:
            lens = tuple(self.prefill_lens)
            if not lens or any(not isinstance(n, int) or n < 1 for n in lens) or len(set(lens)) != len(lens):
                raise InputError(f"--prefill-len {list(lens)}: each length must be a distinct positive integer",
                                 hint="e.g. --prefill-len 32 --prefill-len 128")
            object.__setattr__(self, "prefill_lens", tuple(sorted(lens)))
        if self.bundle is not None and self.bundle not in BUNDLES:
            raise InputError(f"--tflite-bundle {self.bundle!r} is not a bundle kind", hint=f"choose {', '.join(BUNDLES)}")

    @property
    def int4_grid(self) -> str:
        return "symmetric"  # ai-edge-quantizer's blocks have no zero points

    def prefill_lens_for(self, max_seq_len: int) -> tuple[int, ...]:
        lens = self.prefill_lens or (min(DEFAULT_PREFILL_LEN, max_seq_len - 1),)
        if max(lens) > max_seq_len - 1:
            raise InputError(f"--prefill-len {max(lens)} does not fit the KV cache ({max_seq_len} positions)",
                             hint=f"use at most {max_seq_len - 1}, or raise --max-seq-len")
        return lens
