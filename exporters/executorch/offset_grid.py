"""The offset grid (each block of a weight on its own min..max, GGUF Q4_1's grid,
weights.quantize_min_max) on the kernels an ExecuTorch app links.

XNNPACK's 4-bit blocks (qb4w) are symmetric: one zero point per tensor. A weight on the offset
grid is w = scale·(q - 8) + offset per block, so a linear layer becomes what XNNPACK runs:

    y = x·W_symᵀ + means(x)·(32·M)ᵀ + b

W_sym the symmetric part (int4 blocks: the grid's own codes and scales, the scales in bf16 as
XNNPACK stores every block scale, so the reference holds the .pte's weights exactly), means(x)
each input block's mean (a 4-D mean over [tokens, blocks, 32, 1], which XNNPACK runs as global
average pooling where it refuses a 3-D mean) and M the per-block offsets (int8 per row, the
block's 32 folded in: a power of two, so the int8 codes are those of M). M has a 32nd of the
weight's entries. The symmetric part takes int8 dynamic activations as 8da4w does; the block
means read the float input. Every operator is XNNPACK's, so a layer stays in one delegate call
and no side rows are stored. Embedding tables need no side layer: ExecuTorch's embedding_4bit
kernel takes a float zero point per block, so w = scale·(q - 8 - zero_point) holds the grid
itself (in fp16, as CoreML's offsets)."""

from __future__ import annotations

import torch
from torch import nn

from edgepack.exporters.executorch.symmetric_grid import XNNPACK_BLOCK_SCALE, int4_blocks
from edgepack.exporters.weights import OffsetGrid, split_min_max


class OffsetLinear(nn.Module):
    """A linear layer on the offset grid: `symmetric` (int4 blocks) plus `offsets` of the input's
    block means; the bias is in `offsets`."""

    def __init__(self, symmetric: nn.Linear, block: int, offsets: nn.Linear):
        super().__init__()
        self.symmetric, self.block, self.offsets = symmetric, block, offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.shape[-1] // self.block
        means = x.reshape(-1, blocks, self.block, 1).mean((2, 3), keepdim=True)  # the only mean XNNPACK takes
        # the tokens as -1, not as a size read from x: XNNPACK takes no view whose size is computed
        # (so x has a token dimension, as every caller's [batch, tokens, features] has)
        return self.symmetric(x) + self.offsets(means.reshape(*x.shape[:-2], -1, blocks))


def _frozen(linear: nn.Linear, weight) -> nn.Linear:
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def offset_linear(layer: nn.Linear, block: int, dynamic_activations: bool, int8_config) -> OffsetLinear:
    """`layer` on the offset grid; `int8_config` is the torchao config of the offsets' int8 rows."""
    from torchao.quantization import quantize_

    weight = layer.weight.detach().float()
    rows, cols = weight.shape
    codes, scale, offset = split_min_max(weight, block, XNNPACK_BLOCK_SCALE)
    symmetric = _frozen(nn.Linear(cols, rows, bias=False), int4_blocks(
        codes, scale, torch.zeros_like(scale, dtype=torch.int8), block, dynamic_activations))
    offsets = nn.Linear(cols // block, rows, bias=layer.bias is not None)
    with torch.no_grad():
        offsets.weight.copy_(offset * block)  # the forward takes block means, not sums
        if layer.bias is not None:
            offsets.bias.copy_(layer.bias.detach())
    quantize_(offsets, int8_config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return OffsetLinear(symmetric, block, offsets)


def offset_embedding(table: nn.Embedding, block: int) -> None:
    """Store `table` on the offset grid in place (weights.OffsetGrid in fp16): int4 codes, fp16
    scales and zero points; its rows are looked up in fp16 and widened to float32 (a hook)."""
    # The table's kernel (embedding_4bit, outside XNNPACK) keeps its scales as given and reads
    # zero points in its output's dtype: fp16 output keeps both at 2 bytes a block (float32 made
    # the real SmolLM2's .pte 3.5 MB larger), and holds a Q4_1 source's table exactly.
    q, scale, offset = OffsetGrid(torch.float16).blocks(table.weight.detach().float(), block)
    codes = (q - 8).to(torch.int8)  # the kernel's codes are signed: w = scale·(codes - zero point)
    table.weight = nn.Parameter(int4_blocks(codes, scale, offset - 8, block, False, torch.float16),
                                requires_grad=False)
    table.register_forward_hook(_widen)


def _widen(module: nn.Module, inputs: tuple, rows: torch.Tensor) -> torch.Tensor:
    return rows.float()
