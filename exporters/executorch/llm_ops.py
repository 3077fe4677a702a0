"""ExecuTorch's LLM fast path, as a source transform of a captured decoder LM: the KV cache is
written by `llama::update_cache` and attention runs in `llama::custom_sdpa` (a tiled kernel that
reads the cache in place, handles grouped KV heads without copies, and skips the keys beyond the
current position), the kernels ExecuTorch's own `export_llm` uses. The model's code is not forked:
transformers dispatches attention through its AttentionInterface, and the transform registers
one more implementation there and points a copy of the model at it."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface

from edgepack.exporters.decoder import StaticCacheLM
from edgepack.exporters.rotary import halves_rotating_families, rotary_by_split
from edgepack.stages import ModelFacts

ATTENTION = "edgepack_executorch_custom_sdpa"


def _custom_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, *, scaling: float | None = None,
                           start_pos=None, sliding_window: int | None = None, **_) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, head_dim]; key/value: the whole cache [1, max_seq_len, kv_heads, head_dim]
    as CustomOpCacheLM keeps it. Full-attention layers are causal from start_pos, which is exactly
    the static-cache mask; sliding-window layers pass their [T, max_seq_len] mask instead."""
    q = query.transpose(1, 2)
    if sliding_window is not None:
        out = torch.ops.llama.custom_sdpa(q, key, value, 0, attention_mask[0, 0], 0.0, False, scaling)
    else:
        out = torch.ops.llama.custom_sdpa(q, key, value, start_pos, None, 0.0, True, scaling)
    return out, None


def unsupported_reason(config) -> str | None:
    """Why a model cannot take the fast path (it then keeps plain attention), or None."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping (custom_sdpa has no soft-cap)"
    return None


class CustomOpCacheLM(StaticCacheLM):
    """StaticCacheLM with ExecuTorch's cache layout [1, max_seq_len, kv_heads, head_dim] and
    kernels, and the rotary embedding by split (exporters/rotary.py: one kernel call per tensor
    instead of two slices, and cos/sin widened to the heads once per forward, not per layer).
    Same calling convention, same answers up to float rounding."""

    def __init__(self, model: nn.Module, facts: ModelFacts, max_seq_len: int):
        super().__init__(model, facts, max_seq_len)
        self.rotary_families = halves_rotating_families(model)

    def _run(self, tokens: torch.Tensor, input_pos: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        with rotary_by_split(self.rotary_families):
            return super()._run(tokens, input_pos, logits_to_keep)

    def cache_shape(self, facts: ModelFacts, max_seq_len: int) -> tuple[int, ...]:
        return (1, max_seq_len, facts.n_kv_heads, facts.head_dim)

    def write_cache(self, index: int, key_states: torch.Tensor, value_states: torch.Tensor):
        keys = getattr(self, f"k_cache_{index}")
        values = getattr(self, f"v_cache_{index}")
        torch.ops.llama.update_cache(key_states.transpose(1, 2), keys, self.current_start)
        torch.ops.llama.update_cache(value_states.transpose(1, 2), values, self.current_start)
        return keys, values

    def attention_kwargs(self, start: int) -> dict:
        return {"start_pos": start}


def use_llm_custom_ops(module: StaticCacheLM) -> tuple[nn.Module, str | None]:
    """The fast-path twin of a StaticCacheLM, sharing its model object (the caller passes a copy
    it owns: the model's attention implementation is switched in place), or the module unchanged
    and the reason it could not be."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama::*)

    reason = unsupported_reason(module.model.config)
    if reason:
        return module, reason
    AttentionInterface.register(ATTENTION, _custom_sdpa_attention)
    module.model.config._attn_implementation = ATTENTION
    return CustomOpCacheLM(module.model, module.facts, module.max_seq_len).eval(), None
