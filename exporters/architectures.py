"""One row per architecture family: adding a family is adding a row (and its coverage test).

What the front end needs beyond the row (head layout, tied weights, sliding-window layers, rope or
learned positions) is read from the config into ModelFacts, under one vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from edgepack.errors import UnsupportedModelError
from edgepack.stages import ModelFacts


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    task: Literal["causal-lm", "encoder"]
    auto_class: str  # the transformers Auto class that loads it


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "causal-lm", "AutoModelForCausalLM"),  # SmolLM, SmolLM2 too
    Family("qwen2", ("qwen2",), "causal-lm", "AutoModelForCausalLM"),
    Family("qwen3", ("qwen3",), "causal-lm", "AutoModelForCausalLM"),  # q/k norms
    Family("gemma2", ("gemma2",), "causal-lm", "AutoModelForCausalLM"),  # soft-capping, sliding layers
    Family("gemma3", ("gemma3_text",), "causal-lm", "AutoModelForCausalLM"),  # sliding layers, local rope
    Family("phi3", ("phi3",), "causal-lm", "AutoModelForCausalLM"),  # fused qkv and gate_up
    Family("mistral", ("mistral",), "causal-lm", "AutoModelForCausalLM"),  # sliding window on every layer
    Family("gpt2", ("gpt2",), "causal-lm", "AutoModelForCausalLM"),  # learned positions, Conv1D layers
    Family("bert", ("bert",), "encoder", "AutoModel"),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str | None, where: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"{where}: model_type {model_type!r} is not supported",
        hint=f"supported model types: {', '.join(supported_model_types())}",
    )


def model_facts(family: Family, config) -> ModelFacts:
    """Normalize a transformers config's field names."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelFacts(
        family=family.name,
        model_type=text.model_type,
        n_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        n_heads=heads,
        n_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab_size=text.vocab_size,
        max_positions=text.max_position_embeddings,
        rope_theta=(getattr(text, "rope_parameters", None) or {}).get("rope_theta", getattr(text, "rope_theta", None)),
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        sliding_window=getattr(text, "sliding_window", None),
        rope=dict(getattr(text, "rope_parameters", None) or {}) or None,
        layer_types=tuple(text.layer_types) if getattr(text, "layer_types", None) else None,
    )


def linearize(model: nn.Module) -> nn.Module:
    """Replace transformers' Conv1D (GPT-2's transposed linear) with nn.Linear holding the same
    weights, in place, so every backend's quantizer sees (and quantizes) a linear layer."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.nf, bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model
