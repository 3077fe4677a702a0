"""bench.et_decode_floor times S135's linear layers alone as the floor of a decode step: they must be
exactly the weights such a step multiplies by, or the floor it reports is another model's."""

import torch
from torch import nn

from bench.et_decode_floor import decode_linears
from bench.models import COMMON, S135


def _linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    return sorted(tuple(m.weight.shape) for m in module.modules() if isinstance(m, nn.Linear))


def test_the_floor_multiplies_by_every_linear_weight_of_s135_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(**S135, **COMMON))
        floor, (x,) = decode_linears(S135)
    shapes = _linear_shapes(llama)
    # edgepack stores q/k/v as one linear and gate/up as one: their rows stacked, the same weights
    hidden, inner = S135["hidden_size"], S135["intermediate_size"]
    kv = hidden // S135["num_attention_heads"] * S135["num_key_value_heads"]
    for parts, joined in (([(hidden, hidden), (kv, hidden), (kv, hidden)], (hidden + 2 * kv, hidden)),
                          ([(inner, hidden), (inner, hidden)], (2 * inner, hidden))):
        for part in parts:
            for _ in range(S135["num_hidden_layers"]):
                shapes.remove(part)
        shapes += [joined] * S135["num_hidden_layers"]
    assert _linear_shapes(floor) == sorted(shapes)
    assert x.shape == (1, 1, hidden)
    assert floor(x).shape == (1, 1, S135["vocab_size"])
