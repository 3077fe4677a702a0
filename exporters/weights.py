"""Weight-only quantization of an eager module, as the reference for backends that quantize
after conversion (CoreML, TFLite, ONNX): each linear and embedding weight is replaced by its
quantize-dequantize image under the backend's own rounding rules, so eager PyTorch computes the
same math the artifact should."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from edgepack.quant import QuantSpec, WeightQuant


@dataclass(frozen=True)
class Rounding:
    """A backend's symmetric integer grid: q = clamp(round(w / scale), qmin, qmax),
    scale = max|w| over the group / scale_divisor."""

    qmin: int
    qmax: int
    scale_divisor: float

    @classmethod
    def symmetric(cls, bits: int, narrow: bool) -> "Rounding":
        """narrow: [-(2^(b-1)-1), 2^(b-1)-1] (e.g. -7..7); else [-2^(b-1), 2^(b-1)-1] (-8..7)."""
        top = 2 ** (bits - 1) - 1
        return cls(-top if narrow else -top - 1, top, float(top))


def fake_quantize(weight: torch.Tensor, wq: WeightQuant, rounding: Rounding) -> torch.Tensor:
    """Quantize-dequantize a [out, in] weight group-wise along `in` (per row when group_size is None)."""
    rows, cols = weight.shape
    group = wq.group_size or cols
    w = weight.detach().float().reshape(rows, cols // group, group)
    scale = w.abs().amax(dim=-1, keepdim=True) / rounding.scale_divisor
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / scale), rounding.qmin, rounding.qmax)
    return (q * scale).reshape(rows, cols).to(weight.dtype)


def weight_only_reference(module: nn.Module, spec: QuantSpec, rounding_for_bits) -> nn.Module:
    """A copy of `module` whose quantized layers hold fake-quantized weights. `rounding_for_bits`
    maps a bit width to the backend's Rounding. Tied weights stay tied (quantized once)."""
    copied = copy.deepcopy(module)
    done: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for layer in copied.modules():
            wq = spec.for_module(layer)
            if wq is None:
                continue
            weight = layer.weight
            if id(weight) not in done:
                done[id(weight)] = fake_quantize(weight, wq, rounding_for_bits(wq.bits))
                weight.copy_(done[id(weight)])
    return copied
