"""The symmetric grid (`export_llm`'s: 8da4w's int4 blocks, one scale each and no offset) as the
torchao tensors ExecuTorch's lowering reads, each block's scale searched
(weights.search_symmetric_scales) rather than left to torchao's HQQ alone. The offset grid's
symmetric part (offset_grid.py) is stored through the same tensors."""

from __future__ import annotations

import torch
from torch import nn

from edgepack.exporters.weights import search_symmetric_scales

# XNNPACK stores a 4-bit block's scale in bf16 (whatever torch gave it): a reference with finer
# scales is not the model the .pte runs (measured on the real SmolLM2-135M: fp16 scales put the
# .pte at logits cosine 0.963 from its reference, bf16 ones at 0.979, within the reference's noise).
XNNPACK_BLOCK_SCALE = torch.bfloat16

# What the scales of each kind of 4-bit layer are chosen by, for the manifest.
SCALE_SEARCH = "least squares from 12 starts or HQQ, whichever leaves each block closest"


def int4_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, block: int,
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


def symmetric_blocks_(layer: nn.Linear | nn.Embedding, block: int, dynamic_activations: bool) -> None:
    """Store `layer`'s weight on the symmetric grid: a new parameter, so the other user of a tied
    table keeps reading the float one. A linear layer's scales are bf16, as XNNPACK keeps them, and
    its input is quantized to int8 per token at run time (8da4w); a table's scales stay float32,
    as embedding_4bit keeps them."""
    linear = isinstance(layer, nn.Linear)
    codes, scale = search_symmetric_scales(layer.weight.detach().float(), block,
                                           XNNPACK_BLOCK_SCALE if linear else torch.float32)
    layer.weight = nn.Parameter(int4_blocks(codes, scale, torch.zeros_like(scale, dtype=torch.int8), block,
                                            linear and dynamic_activations), requires_grad=False)
