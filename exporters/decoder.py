"""Front end, part 2: decoder LMs get an explicit, static KV cache and the calling convention of
ExecuTorch's LLM runner: forward(tokens int64 [1, T], input_pos int64 [1]) -> logits [1, vocab].

The cache lives in buffers updated by slice assignment at input_pos. torch.export turns that into
buffer mutations (slice_scatter) that every backend understands, where transformers' StaticCache
uses index_copy, which CoreML cannot convert. The attention mask and positions are built here,
so the model's own code runs unchanged."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from edgepack.stages import ModelFacts


class _SliceUpdateLayer(CacheLayerMixin):
    """One layer's cache: writes the new keys/values at the current position, returns the whole cache."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "StaticCacheLM", index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        keys = getattr(self.owner, f"k_cache_{self.index}")
        values = getattr(self.owner, f"v_cache_{self.index}")
        start, length = self.owner.current_start, key_states.shape[-2]
        keys[:, :, start:start + length] = key_states
        values[:, :, start:start + length] = value_states
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.max_seq_len, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly

    def get_max_length(self) -> int:
        return self.owner.max_seq_len


class StaticCacheLM(nn.Module):
    """A Hugging Face causal LM behind the ExecuTorch LLM runner's calling convention."""

    def __init__(self, model: nn.Module, facts: ModelFacts, max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.current_start = 0
        shape = (1, facts.n_kv_heads, max_seq_len, facts.head_dim)
        for i in range(facts.n_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)
        self.cache = Cache(layers=[_SliceUpdateLayer(self, i) for i in range(facts.n_layers)])

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + length <= self.max_seq_len)
        self.current_start = start
        positions = (torch.arange(length, dtype=torch.int64) + input_pos[0]).unsqueeze(0)
        # Key j is visible to query i when j <= position(i): causal over the whole static cache,
        # which also hides stale entries left beyond the current position by an earlier sequence.
        visible = torch.arange(self.max_seq_len, dtype=torch.int64).unsqueeze(0) <= positions[0].unsqueeze(1)
        mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]


class EncoderLastHidden(nn.Module):
    """forward(input_ids [1, T], attention_mask [1, T]) -> last_hidden_state [1, T, hidden]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
