"""Grouped-query attention without copying the KV cache, for backends whose converters lower
transformers' own attention literally (TFLite, ONNX; CoreML keeps transformers' attention: its
converter froze the sequence length of the regrouped tensors to the traced example's).

transformers repeats each KV head for the query heads that share it (repeat_kv: expand, then
reshape) before the two matmuls. Converted, that is a copy of the whole cache per layer and
token: a BROADCAST_TO that LiteRT's XNNPACK delegate does not take (3.3 ms of a 220 ms decode
step, 60 times, on SmolLM2-135M at a 512-token cache), an Expand in ONNX. Here the query heads of
one group are stacked as rows instead ([1, kv_heads, groups * T, head_dim]), so each KV head is
read in place by one batched matmul. The arithmetic is the same dot products."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "edgepack_grouped_query"


def _grouped_query_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             softcap: float | None = None, **_) -> tuple[torch.Tensor, None]:
    """query [B, heads, T, D], key/value [B, kv_heads, S, D], attention_mask additive [B, 1, T, S'];
    returns [B, T, heads, D] as transformers' implementations do. Head h reads KV head
    h // groups (repeat_kv's order), so the groups stack in head order."""
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # Shapes are written so that torch.export proves them for a symbolic T: the query made
    # contiguous, -1 for the regrouped lengths, the output split back before its transpose.
    scores = torch.matmul(query.contiguous().reshape(batch, kv_heads, -1, dim), key.transpose(-1, -2))
    scores = scores * (dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:  # Gemma 2
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:  # row j * T + t is query token t of group member j: the mask tiled
        scores = scores + attention_mask[..., :keys].repeat(1, 1, groups, 1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)  # [B, kv_heads, groups * T, D] -> [B, T, heads, D]
    out = out.view(batch, kv_heads, groups, -1, dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads, dim), None


@contextlib.contextmanager
def grouped_query_attention(model: nn.Module) -> Iterator[None]:
    """While inside, `model` (a transformers model) runs its attention through the grouped form
    when it has fewer KV heads than query heads; its own implementation is restored on leaving
    (the fp32 reference stays transformers' own forward)."""
    config = model.config
    text = config.get_text_config()
    heads = text.num_attention_heads
    if (getattr(text, "num_key_value_heads", None) or heads) == heads:
        yield
        return
    AttentionInterface.register(NAME, _grouped_query_attention)
    AttentionMaskInterface.register(NAME, eager_mask)  # an additive float mask, always built
    saved = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = saved
