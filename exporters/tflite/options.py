"""TFLite's own export options (its `edgepack export` flags are generated from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepack.errors import InputError
from edgepack.exporters.backend import INT4_GRIDS, flag

# LiteRT-LM's own conversions use 128-token prefill signatures; a prompt is prefilled in chunks of
# this length (padded), so a longer default wastes compute on short prompts and a shorter one adds
# calls on long ones. It must leave room for one decode step: at most max_seq_len - 1.
DEFAULT_PREFILL_LEN = 128
BUNDLES = ("litertlm",)


@dataclass(frozen=True)
class Options:
    """prefill_lens: one prefill_<N> signature per length (default: min(128, max_seq_len - 1));
    bundle: also write a LiteRT-LM bundle ('litertlm'); grid: a decoder LM's int4 grid
    (exporters/tflite/offset_grid.py; encoders keep the symmetric one)."""

    prefill_lens: tuple[int, ...] | None = field(default=None, metadata=flag(
        "--prefill-len", "TFLite: a prefill signature's fixed prompt length; repeat for several.", int, multiple=True))
    bundle: str | None = field(default=None, metadata=flag(
        "--tflite-bundle", "TFLite: also write a LiteRT-LM bundle ('litertlm').", str))
    grid: str = field(default="offset", metadata=flag(
        "--tflite-grid", "TFLite: a decoder LM's int4 grid: 'offset' (each block its own min..max: int4 blocks plus an "
        "int8 offset per 32 weights; the default) or 'symmetric' (ai-edge-quantizer's own: smaller, faster, less "
        "accurate; on the real SmolLM2-135M +38.6 % perplexity against +6.5 %, decoding 1.3x faster on LiteRT-LM, "
        "docs/limits.md). Encoders use 'symmetric'.", str))

    def __post_init__(self):
        if self.prefill_lens is not None:
            lens = tuple(self.prefill_lens)
            if not lens or any(not isinstance(n, int) or n < 1 for n in lens) or len(set(lens)) != len(lens):
                raise InputError(f"--prefill-len {list(lens)}: each length must be a distinct positive integer",
                                 hint="e.g. --prefill-len 32 --prefill-len 128")
            object.__setattr__(self, "prefill_lens", tuple(sorted(lens)))
        if self.bundle is not None and self.bundle not in BUNDLES:
            raise InputError(f"--tflite-bundle {self.bundle!r} is not a bundle kind", hint=f"choose {', '.join(BUNDLES)}")
        if self.grid not in INT4_GRIDS:
            raise InputError(f"--tflite-grid {self.grid!r} is not a grid", hint=f"choose {' or '.join(INT4_GRIDS)}")

    @property
    def int4_grid(self) -> str:
        return self.grid

    def prefill_lens_for(self, max_seq_len: int) -> tuple[int, ...]:
        lens = self.prefill_lens or (min(DEFAULT_PREFILL_LEN, max_seq_len - 1),)
        if max(lens) > max_seq_len - 1:
            raise InputError(f"--prefill-len {max(lens)} does not fit the KV cache ({max_seq_len} positions)",
                             hint=f"use at most {max_seq_len - 1}, or raise --max-seq-len")
        return lens
