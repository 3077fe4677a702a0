"""The offset grid (each block of a weight on its own min..max, GGUF Q4_1's grid,
weights.quantize_min_max) on the kernels an ExecuTorch app links.

XNNPACK's 4-bit blocks (qb4w) are symmetric: one zero point per tensor. A weight on the offset
grid is w = scale·(q - 8) + offset per block, so a linear layer becomes two that XNNPACK runs:

    [y_sym, sums(x)] = x·[W_sym; I]ᵀ        y = y_sym + sums(x)·Mᵀ + b

W_sym the symmetric part (int4 blocks: the grid's own codes and scales, the scales in bf16 as
XNNPACK stores every block scale, so the reference holds the .pte's weights exactly), I the
indicator rows below it (0/1 per input block: code 4 × scale 0.25, exact), whose outputs are each
input block's sum, and M the per-block offsets (int8 per row). M has a 32nd of the weight's
entries, I in/32 rows of `in`. Every linear takes int8 dynamic activations as 8da4w does; I's
rows share W_sym's linear, as shared_input.py's layers do, so the input is quantized and
multiplied once (its rows are independent: the same arithmetic as two linears). Embedding tables
need no side layer: ExecuTorch's embedding_4bit kernel takes a float zero point per block, so
w = scale·(q - 8 - zero_point) holds the grid itself (in fp16, as CoreML's offsets)."""

from __future__ import annotations

import torch
from torch import nn

from edgepack.exporters.weights import OffsetGrid, split_min_max

# XNNPACK stores a 4-bit block's scale in bf16 (whatever torch gave it): a reference with finer
# scales is not the model the .pte runs (measured on the real SmolLM2-135M: fp16 scales put the
# .pte at logits cosine 0.963 from its reference, bf16 ones at 0.979, within the reference's noise).
XNNPACK_BLOCK_SCALE = torch.bfloat16
# An indicator row's ones as int4 code × scale, both exact in XNNPACK's bf16 block scales.
_ONE_CODE, _ONE_SCALE = 4, 0.25


class OffsetLinear(nn.Module):
    """A linear layer on the offset grid: its first `rows` outputs of `wide` (the symmetric part),
    plus `offsets` of the rest (the block sums); the bias is in `offsets`."""

    def __init__(self, wide: nn.Linear, rows: int, offsets: nn.Linear):
        super().__init__()
        self.wide, self.rows, self.offsets = wide, rows, offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.wide(x)
        symmetric, sums = both.split([self.rows, both.shape[-1] - self.rows], dim=-1)  # one kernel, as SharedInput
        return symmetric + self.offsets(sums)


def _int4_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, block: int,
                 dynamic_activations: bool, dtype: torch.dtype = torch.float32):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    return IntxUnpackedToInt8Tensor(
        qdata=codes, scale=scale, zero_point=zero_point, target_dtype=torch.int4, block_size=(1, block),
        dtype=dtype,
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN
        if dynamic_activations else None)


def _frozen(linear: nn.Linear, weight) -> nn.Linear:
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def _indicator(cols: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indicator rows' int4 codes and block scales: row i sums input block i."""
    blocks = cols // block
    codes = torch.zeros(blocks, cols, dtype=torch.int8)
    codes.view(blocks, blocks, block)[torch.arange(blocks), torch.arange(blocks)] = _ONE_CODE
    return codes, torch.full((blocks, blocks), _ONE_SCALE)


def offset_linear(layer: nn.Linear, block: int, dynamic_activations: bool, int8_config) -> OffsetLinear:
    """`layer` on the offset grid; `int8_config` is the torchao config of the offsets' int8 rows."""
    from torchao.quantization import quantize_

    weight = layer.weight.detach().float()
    rows, cols = weight.shape
    blocks = cols // block
    codes, scale, offset = split_min_max(weight, block, XNNPACK_BLOCK_SCALE)
    ones, one_scale = _indicator(cols, block)
    codes, scale = torch.cat([codes, ones]), torch.cat([scale, one_scale.to(scale.dtype)])
    wide = _frozen(nn.Linear(cols, rows + blocks, bias=False), _int4_blocks(
        codes, scale, torch.zeros_like(scale, dtype=torch.int8), block, dynamic_activations))
    offsets = nn.Linear(blocks, rows, bias=layer.bias is not None)
    with torch.no_grad():
        offsets.weight.copy_(offset)
        if layer.bias is not None:
            offsets.bias.copy_(layer.bias.detach())
    quantize_(offsets, int8_config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return OffsetLinear(wide, rows, offsets)


def offset_embedding(table: nn.Embedding, block: int) -> None:
    """Store `table` on the offset grid in place (weights.OffsetGrid in fp16): int4 codes, fp16
    scales and zero points; its rows are looked up in fp16 and widened to float32 (a hook)."""
    # The table's kernel (embedding_4bit, outside XNNPACK) keeps its scales as given and reads
    # zero points in its output's dtype: fp16 output keeps both at 2 bytes a block (float32 made
    # the real SmolLM2's .pte 3.5 MB larger), and holds a Q4_1 source's table exactly.
    q, scale, offset = OffsetGrid(torch.float16).blocks(table.weight.detach().float(), block)
    codes = (q - 8).to(torch.int8)  # the kernel's codes are signed: w = scale·(codes - zero point)
    table.weight = nn.Parameter(_int4_blocks(codes, scale, offset - 8, block, False, torch.float16),
                                requires_grad=False)
    table.register_forward_hook(_widen)


def _widen(module: nn.Module, inputs: tuple, rows: torch.Tensor) -> torch.Tensor:
    return rows.float()
