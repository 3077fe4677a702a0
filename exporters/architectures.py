"""One row per architecture family: adding a family is adding a row (and its coverage test)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgepack.errors import UnsupportedModelError
from edgepack.stages import ModelFacts


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    task: Literal["causal-lm", "encoder"]
    auto_class: str  # the transformers Auto class that loads it


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "causal-lm", "AutoModelForCausalLM"),
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
    )
