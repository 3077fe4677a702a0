"""Front end, part 2: decoder LMs get an explicit, static KV cache and the calling convention of
ExecuTorch's LLM runner: forward(tokens int64 [1, T], input_pos int64 [1]) -> logits [1, vocab].

The cache lives in buffers updated by slice assignment at input_pos. torch.export turns that into
buffer mutations (slice_scatter) that every backend understands, where transformers' StaticCache
uses index_copy, which CoreML cannot convert. The attention mask and positions are built here,
so the model's own code runs unchanged."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from edgepack.stages import ModelFacts


class _SliceUpdateLayer(CacheLayerMixin):
    """One layer's cache for transformers' attention: the owner writes the new keys/values at the
    current position and returns the whole cache (in place for StaticCacheLM, as new tensors for
    ExplicitCacheLM)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: nn.Module, index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.write_cache(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.max_seq_len, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly

    def get_max_length(self) -> int:
        return self.owner.max_seq_len


def hold_rope_static(model: nn.Module, facts: ModelFacts, max_seq_len: int) -> None:
    """transformers' dynamic and LongRoPE rotaries rewrite their frequencies at every call from the
    sequence's length: a data-dependent branch torch.export cannot trace (dynamic NTK), or a buffer
    update CoreML cannot convert (LongRoPE). Up to a length (the model's positions; LongRoPE's
    original length) they keep the frequencies they start with, so a cache no longer than that runs
    them as the plain rope they are there. Past it they are left as they are."""
    ropes = facts.rope or {}
    for rotary in model.modules():
        kinds = getattr(rotary, "rope_type", None)  # one, or one per layer type (Gemma 3's {kind}_inv_freq)
        if kinds is None or not any(name.endswith("inv_freq") for name, _ in rotary.named_buffers(recurse=False)):
            continue
        held = {kind: "default" if max_seq_len <= _static_up_to(rotary, rope_type, ropes.get(kind, ropes), facts) else rope_type
                for kind, rope_type in (kinds.items() if isinstance(kinds, dict) else [(None, kinds)])}
        rotary.rope_type = held if isinstance(kinds, dict) else held[None]


def longrope_original_length(facts: ModelFacts | None) -> int | None:
    """The length up to which a LongRoPE model's rope stays static (its short factors; past it the
    rotary switches, see hold_rope_static), or None for the other ropes."""
    rope = (facts.rope or {}) if facts else {}
    return rope.get("original_max_position_embeddings") if rope.get("rope_type") == "longrope" else None


def _static_up_to(rotary: nn.Module, rope_type: str, rope: dict, facts: ModelFacts) -> int:
    """How long a cache keeps `rope_type`'s first frequencies (0: the other types, which never
    change them, keep their name)."""
    if "dynamic" in rope_type:  # grows past, and only past, the positions it was built for
        return getattr(rotary, "original_max_seq_len", facts.max_positions)
    if rope_type == "longrope":  # short factors up to the original length, long ones past it
        return rope.get("original_max_position_embeddings") or 0
    return 0


class StaticCacheLM(nn.Module):
    """A Hugging Face causal LM behind the ExecuTorch LLM runner's calling convention."""

    def __init__(self, model: nn.Module, facts: ModelFacts, max_seq_len: int):
        super().__init__()
        self.model = model
        self.facts = facts
        self.max_seq_len = max_seq_len
        self.current_start = 0
        shape = self.cache_shape(facts, max_seq_len)
        for i in range(facts.n_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)
        self.cache = Cache(layers=[_SliceUpdateLayer(self, i) for i in range(facts.n_layers)])

    def cache_shape(self, facts: ModelFacts, max_seq_len: int) -> tuple[int, ...]:
        return (1, facts.n_kv_heads, max_seq_len, facts.head_dim)

    def attention_kwargs(self, start) -> dict:
        """Extra keyword arguments the model passes down to its attention implementation."""
        return {}

    def write_cache(self, index: int, key_states: torch.Tensor, value_states: torch.Tensor):
        keys = getattr(self, f"k_cache_{index}")
        values = getattr(self, f"v_cache_{index}")
        start, length = self.current_start, key_states.shape[-2]
        keys[:, :, start:start + length] = key_states
        values[:, :, start:start + length] = value_states
        return keys, values

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """The last position's logits [1, vocab], as the runner reads them."""
        return self._run(tokens, input_pos, logits_to_keep=1)[:, -1, :]

    def position_logits(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Every position's logits [length, vocab]: a teacher-forced decode in one pass (eager only)."""
        return self._run(tokens, input_pos, logits_to_keep=0)[0]

    def _run(self, tokens: torch.Tensor, input_pos: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        length = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + length <= self.max_seq_len)
        self.current_start = start
        positions = (torch.arange(length, dtype=torch.int64) + input_pos[0]).unsqueeze(0)
        out = self.model(input_ids=tokens, attention_mask=attention_masks(positions[0], self.max_seq_len, self.facts),
                         position_ids=positions, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=logits_to_keep, **self.attention_kwargs(start))
        return out.logits


def attention_masks(positions: torch.Tensor, max_seq_len: int, facts: ModelFacts):
    """The additive mask(s) [1, 1, T, max_seq_len] the model's attention takes. Key j is visible to
    query i when j <= position(i) (causal over the whole static cache, which also hides stale
    entries left beyond the current position by an earlier sequence or a padded prefill) and, on a
    sliding layer, when position(i) - j < sliding_window. Models whose config lists layer_types
    take one mask per layer type; the others take a single mask."""
    keys = torch.arange(max_seq_len, dtype=torch.int64).unsqueeze(0)
    query = positions.unsqueeze(1)

    def mask(window: int | None) -> torch.Tensor:
        visible = keys <= query
        if window is not None and window < max_seq_len:
            visible = visible & (keys > query - window)
        return torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]

    if facts.layer_types is None:
        return mask(facts.sliding_window)
    return {kind: mask(facts.sliding_window if kind == "sliding_attention" else None)
            for kind in sorted(set(facts.layer_types))}


POOLINGS = ("none", "mean", "cls")


class EncoderOutput(nn.Module):
    """forward(input_ids [1, T], attention_mask [1, T]) -> last_hidden_state [1, T, hidden]
    (pooling "none"), or a sentence embedding [1, hidden]: the mask-weighted mean of the token
    states ("mean", as sentence-transformers models are trained) or the first token's ("cls")."""

    def __init__(self, model: nn.Module, pooling: str = "none"):
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return hidden


# (cache [1, kv_heads, max_seq_len, head_dim], new [1, kv_heads, T, head_dim], input_pos [T]) -> updated cache
CacheUpdate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ExplicitCacheLM(nn.Module):
    """A Hugging Face causal LM with its KV cache passed in and out, for runtimes without mutable
    buffers (TFLite; ONNX with a growing cache). The names follow LiteRT's LLM convention:

        forward(tokens [1, T], input_pos [T], kv_cache {"k_i", "v_i": [1, kv_heads, max_seq_len, head_dim]})
          -> {"logits": [1, 1, vocab] at the last position, "kv_cache": the updated caches}

    input_pos holds each token's position (consecutive). `update` writes one layer's new keys or
    values into its cache; backends pass the form their converter lowers best. With
    `logits=False` only the caches are returned (a prefill whose last logits the app never reads)."""

    def __init__(self, model: nn.Module, facts: ModelFacts, max_seq_len: int, update: CacheUpdate,
                 *, logits: bool = True):
        super().__init__()
        self.model = model
        self.logits = logits
        self.facts = facts
        self.max_seq_len = max_seq_len
        self.update = update
        self.cache_shape = (1, facts.n_kv_heads, max_seq_len, facts.head_dim)
        self.n_layers = facts.n_layers
        self.cache = Cache(layers=[_SliceUpdateLayer(self, i) for i in range(facts.n_layers)])
        self._step: tuple[dict, torch.Tensor, dict] | None = None  # (caches in, input_pos, caches out)

    def empty_cache(self) -> dict[str, torch.Tensor]:
        return {f"{kind}_{i}": torch.zeros(self.cache_shape) for i in range(self.n_layers) for kind in "kv"}

    def write_cache(self, index: int, key_states: torch.Tensor, value_states: torch.Tensor):
        caches, input_pos, written = self._step
        for kind, new in (("k", key_states), ("v", value_states)):
            written[f"{kind}_{index}"] = self.update(caches[f"{kind}_{index}"], new, input_pos)
        return written[f"k_{index}"], written[f"v_{index}"]

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_cache: dict[str, torch.Tensor]) -> dict:
        self._step = (kv_cache, input_pos, {})
        try:
            out = self.model(input_ids=tokens, attention_mask=attention_masks(input_pos, self.max_seq_len, self.facts),
                             position_ids=input_pos.unsqueeze(0), past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)
            caches = {"kv_cache": self._step[2]}
            return {"logits": out.logits, **caches} if self.logits else caches
        finally:
            self._step = None
