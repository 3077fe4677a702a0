"""A decoder's attention as ONNX Runtime's fused GroupQueryAttention (com.microsoft), the op
onnxruntime-genai's own model builder emits: one node per layer appends the new keys and values
to the past, applies the causal (and sliding-window) mask, the soft-cap and the softmax, and
reads each KV head in place for its group of query heads. Written out in plain ONNX ops the same
layer is about 15 nodes (concatenations, transposes, two matmuls, the mask), and at a decode step
of a small model it is the per-node overhead, not the arithmetic, that costs: on the real
SmolLM2-135M plain attention decoded at 0.6x the builder's model (bench.ort_genai_anchor).

How: while the decoder is traced, transformers' attention of every layer calls
group_query_attention, which torch.onnx.export records as the fused node
(torch.onnx.ops.symbolic_multi_out) and which runs the same arithmetic in torch otherwise. The
layer's past comes from the graph's inputs and its present goes to the graph's outputs through
`_Step`, since transformers hands the attention function only the cache's return value."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from edgepack.exporters.decoder import ExplicitCacheLM
from edgepack.exporters.rotary import halves_rotating_families, replaced_rotary, rotate
from edgepack.stages import ModelFacts

NAME = "edgepack_ort_group_query"
NO_WINDOW = -1  # GroupQueryAttention's local_window_size when every past key is visible


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
            past_value: torch.Tensor, scale: float, softcap: float, window: int,
            rotary: tuple[torch.Tensor, torch.Tensor] | None):
    """GroupQueryAttention's arithmetic in torch, for runs outside the ONNX export. query
    [1, heads, T, D], key/value [1, kv_heads, T, D] (the new tokens), past_key/value
    [1, kv_heads, P, D] -> (out [1, T, heads * D], present key, present value [1, kv_heads, P + T, D]).
    The new query and key are first rotated by `rotary` (cos, sin [1, T, D]) when given. Query t
    sits at position P + t and sees key j when j <= P + t and, with a window, P + t - j < window;
    scores are soft-capped (softcap > 0) before the softmax."""
    if rotary is not None:
        query, key = rotate(query, *rotary), rotate(key, *rotary)
    present_key, present_value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    scores = torch.matmul(query, present_key.repeat_interleave(groups, dim=1).transpose(-1, -2)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    total = present_key.shape[2]
    offsets = torch.arange(total - length, total).unsqueeze(1) - torch.arange(total).unsqueeze(0)
    visible = (offsets >= 0) & (offsets < window) if window > 0 else offsets >= 0
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.matmul(probs, present_value.repeat_interleave(groups, dim=1))
    return out.transpose(1, 2).reshape(batch, length, heads * dim), present_key, present_value


def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, positions: torch.Tensor, scale: float, softcap: float,
                          window: int, rotary: tuple[torch.Tensor, torch.Tensor] | None = None):
    """_attend's arguments and results; under torch.onnx.export one com.microsoft node, with the
    lengths it wants (seqlens_k: total - 1 per batch row, and the total, int32) taken from the
    last new token's position (`positions` [1, T], the cache positions), not from the past's
    shape: with onnxruntime-genai's past_present_share_buffer the past is a buffer of the whole
    context whose first total - T rows are filled, and the op writes the new rows in place.
    The op rotates by position ids into cos/sin tables of at least the present's rows: here this
    call's own cos/sin rows (what the model's rotary module computed for these tokens, whatever
    its scaling), padded by the past's rows, read at 0 .. T - 1."""
    if not torch.onnx.is_in_onnx_export():
        return _attend(query, key, value, past_key, past_value, scale, softcap, window, rotary)
    batch, heads, length, dim = query.shape
    kv_heads, total = key.shape[1], past_key.shape[2] + length

    def rows(x: torch.Tensor) -> torch.Tensor:  # [1, N, T, D] -> [1, T, N * D]
        return x.transpose(1, 2).reshape(batch, length, -1)

    def table(x: torch.Tensor) -> torch.Tensor:  # [1, T, D] -> [P + T, D / 2]
        return torch.cat([x[0, :, :dim // 2], x.new_zeros(past_key.shape[2], dim // 2)])

    last = positions[:, -1].to(torch.int32)
    seqlens, total_length = last.expand(batch), last[0] + 1
    inputs = [rows(query), rows(key), rows(value), past_key, past_value, seqlens, total_length]
    if rotary is not None:
        inputs += [table(rotary[0]), table(rotary[1]), torch.arange(length).unsqueeze(0)]
    present = (batch, kv_heads, total, dim)
    return torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention", inputs,
        {"num_heads": heads, "kv_num_heads": kv_heads, "scale": scale, "softcap": softcap,
         "local_window_size": window, "do_rotary": int(rotary is not None), "rotary_interleaved": 0},
        dtypes=(query.dtype, key.dtype, value.dtype), shapes=((batch, length, heads * dim), present, present), version=1)


@dataclass
class _Step:
    """One call's caches: the past by layer (graph inputs), the new tokens' cache positions [1, T]
    and the present the op returns; and the rotary cos/sin a layer deferred to the op (set by
    _deferred_rotary, taken by _attention)."""

    past: dict[str, torch.Tensor]
    positions: torch.Tensor
    windows: list[int]
    present: dict[str, torch.Tensor] = field(default_factory=dict)
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


_STEP: contextvars.ContextVar[_Step] = contextvars.ContextVar("edgepack_gqa_step")


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
               scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None, **_):
    """transformers' attention function: key/value are the layer's new tokens (the cache's update
    returns them as they are); returns [1, T, heads, D] as transformers' implementations do."""
    step, index = _STEP.get(), module.layer_idx
    rotary, step.rotary = step.rotary, None
    dim = query.shape[-1]
    if rotary is not None and rotary[0].shape[-1] != dim:  # partial rotary: the op is not asked to
        query, key, rotary = rotate(query, *rotary), rotate(key, *rotary), None
    out, step.present[f"k_{index}"], step.present[f"v_{index}"] = group_query_attention(
        query, key, value, step.past[f"k_{index}"], step.past[f"v_{index}"], step.positions,
        dim ** -0.5 if scaling is None else scaling, softcap or 0.0, step.windows[index], rotary)
    return out.reshape(*out.shape[:2], -1, dim), None


def _deferred_rotary(original):
    """A family's apply_rotary_pos_emb(q, k, cos, sin) that leaves q and k as they are and hands
    cos and sin to the layer's fused attention, where the rotation happens; the original where
    the rotary covers only part of the features it is given."""
    def apply(q, k, cos, sin, *args, **kwargs):
        step = _STEP.get(None)
        if step is None or cos.shape[-1] != q.shape[-1] or cos.dim() != 3 or args or kwargs:
            return original(q, k, cos, sin, *args, **kwargs)
        step.rotary = (cos, sin)
        return q, k
    return apply


def layer_windows(facts: ModelFacts) -> list[int]:
    """Each layer's local_window_size: the sliding window on the layers it bounds."""
    return [facts.sliding_window if sliding else NO_WINDOW for sliding in facts.sliding_layers()]


def _new_tokens(cache: torch.Tensor, new: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """The cache update the attention op expects: the op appends the new tokens to the past itself."""
    return new


class GroupQueryAttentionDecoder(nn.Module):
    """PastPresentDecoder's calling convention (onnx_capture) with each layer's attention and cache
    growth done by the fused op (fused_attention is entered for the call, inside whatever
    attention the export set up)."""

    def __init__(self, model: nn.Module, facts: ModelFacts):
        super().__init__()
        self.model = model
        self.facts = facts
        # Found here, not in forward: the check runs torch ops that a trace must not see.
        self.rotary_families = halves_rotating_families(model)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past: dict[str, torch.Tensor]):
        step = _Step(past, position_ids, layer_windows(self.facts))
        token = _STEP.set(step)
        try:
            total = past["k_0"].shape[2] + input_ids.shape[1]
            with fused_attention(self.model, self.rotary_families):
                out = ExplicitCacheLM(self.model, self.facts, total, _new_tokens)(input_ids, position_ids[0], past)
        finally:
            _STEP.reset(token)
        missing = [f"{kind}_{i}" for i in range(self.facts.n_layers) for kind in "kv" if f"{kind}_{i}" not in step.present]
        if missing:
            raise RuntimeError(f"{type(self.model).__name__}'s layers {missing[:4]} did not call transformers' "
                               "attention interface; their attention cannot be fused")
        return (out["logits"], *(step.present[f"{kind}_{i}"] for i in range(self.facts.n_layers) for kind in "kv"))


@contextlib.contextmanager
def fused_attention(model: nn.Module, rotary_families: tuple[str, ...]) -> Iterator[None]:
    """While inside, `model` (a transformers model) runs its attention through the fused op, which
    also applies the rotary embedding of `rotary_families` (halves_rotating_families)."""
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = NAME
    try:
        with replaced_rotary(rotary_families, _deferred_rotary):
            yield
    finally:
        config._attn_implementation = saved
