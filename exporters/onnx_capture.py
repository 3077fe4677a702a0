"""The captured model as an ONNX graph, for the backends that start from one (ONNX Runtime's own,
and MNN, whose converter reads ONNX): one calling convention, one torch.onnx export.

Decoder LMs take the KV cache as inputs and return it grown (onnxruntime-genai's names): each
call takes `past_key_values.N.key/value` [1, kv_heads, past_len, head_dim] and returns
`present.N.key/value` [1, kv_heads, past_len + T, head_dim], the past followed by the new tokens;
the first call passes past_len 0. (ONNX's fused attention also takes genai's shared buffer:
exporters/onnx/metadata.py.) Other models keep the captured signature."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from edgepack.exporters.attention import grouped_query_attention
from edgepack.exporters.decoder import ExplicitCacheLM
from edgepack.stages import CapturedModel, MethodSpec, TensorSpec

PAST = ("past_key_values.%d.key", "past_key_values.%d.value")
PRESENT = ("present.%d.key", "present.%d.value")
INPUT_IDS, POSITION_IDS, LOGITS = "input_ids", "position_ids", "logits"
# What torch.onnx records on each node: the classes and the module paths it was traced in.
_CLASSES = "pkg.torch.onnx.class_hierarchy"
_SCOPES = "pkg.torch.onnx.name_scopes"


def cache_names(n_layers: int, templates: tuple[str, str]) -> list[str]:
    """Layer by layer, key then value: the order the graph's inputs and outputs follow."""
    return [t % i for i in range(n_layers) for t in templates]


def _append(cache: torch.Tensor, new: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """The growing cache: present = past followed by the new keys or values."""
    return torch.cat([cache, new], dim=2)


class PastPresentDecoder(nn.Module):
    """forward(input_ids [1, T], position_ids [1, T], past {"k_i", "v_i": [1, kv_heads, P, head_dim]})
    -> (logits [1, 1, vocab], present k_0, v_0, k_1, ... [1, kv_heads, P + T, head_dim]).

    ExplicitCacheLM with the cache written by concatenation. Its attention mask spans
    `max_seq_len` keys; here the keys are the past and the new tokens, so each call builds it for
    exactly P + T (a symbolic length in the exported graph)."""

    def __init__(self, model: nn.Module, facts):
        super().__init__()
        self.model = model
        self.facts = facts

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past: dict[str, torch.Tensor]):
        total = past["k_0"].shape[2] + input_ids.shape[1]
        out = ExplicitCacheLM(self.model, self.facts, total, _append)(input_ids, position_ids[0], past)
        present = out["kv_cache"]
        return (out["logits"], *(present[f"{kind}_{i}"] for i in range(self.facts.n_layers) for kind in "kv"))


@dataclass(frozen=True)
class OnnxSignature:
    """What torch.onnx.export is given, and the methods the manifest lists for the graph."""

    module: nn.Module
    args: tuple
    kwargs: dict
    dynamic_shapes: Any
    input_names: list[str]
    output_names: list[str]
    methods: tuple[MethodSpec, ...]


def _decoder_signature(captured: CapturedModel, model: nn.Module, decoder: type[nn.Module]) -> OnnxSignature:
    facts, max_seq_len = captured.loaded.facts, captured.llm_metadata["get_max_seq_len"]
    # The example: 3 new tokens after a past of at least 2 (torch.export specializes lengths 0 and
    # 1). With a sliding window shorter than the cache, past + 3 exceeds the window, so the trace
    # takes attention_masks' windowed branch (decided in Python from the example); the windowed
    # mask is also right for shorter lengths, where the window hides nothing.
    window = facts.sliding_window
    past_len = window - 2 if window is not None and 4 <= window < max_seq_len else 2
    cache = (1, facts.n_kv_heads, past_len, facts.head_dim)
    past = {f"{kind}_{i}": torch.zeros(cache) for i in range(facts.n_layers) for kind in "kv"}
    seq = Dim("sequence_length", min=1, max=max_seq_len - 1)
    past_dim = Dim("past_sequence_length", min=0, max=max_seq_len - 1)
    input_names = [INPUT_IDS, POSITION_IDS, *cache_names(facts.n_layers, PAST)]
    output_names = [LOGITS, *cache_names(facts.n_layers, PRESENT)]

    def kv(name: str, length: str) -> TensorSpec:
        return TensorSpec(name, "float32", (1, facts.n_kv_heads, length, facts.head_dim))

    method = MethodSpec(
        "forward",
        inputs=(TensorSpec(INPUT_IDS, "int64", (1, "sequence_length")),
                TensorSpec(POSITION_IDS, "int64", (1, "sequence_length")),
                *(kv(n, "past_sequence_length") for n in input_names[2:])),
        outputs=(TensorSpec(LOGITS, "float32", (1, 1, facts.vocab_size)),
                 *(kv(n, "total_sequence_length") for n in output_names[1:])),
        dynamic_dims={"sequence_length": (1, max_seq_len - 1), "past_sequence_length": (0, max_seq_len - 1),
                      "total_sequence_length": (1, max_seq_len)},
    )
    return OnnxSignature(
        decoder(model, facts).eval(),
        (torch.zeros(1, 3, dtype=torch.int64), torch.arange(past_len, past_len + 3).unsqueeze(0)),
        {"past": past},
        {"input_ids": {1: seq}, "position_ids": {1: seq}, "past": {k: {2: past_dim} for k in past}},
        input_names, output_names, (method,))


def _module_signature(captured: CapturedModel, model: nn.Module) -> OnnxSignature:
    """Encoders and plain modules: the captured module as is, inputs and outputs named as the
    manifest names them (input_ids / attention_mask, input_0 ...; last_hidden_state, output_0 ...)."""
    [method] = captured.methods
    return OnnxSignature(model, tuple(captured.example_inputs), {}, captured.dynamic_shapes,
                         [t.name for t in method.inputs], [t.name for t in method.outputs], (method,))


def onnx_signature(captured: CapturedModel, model: nn.Module | None = None, *,
                   decoder: type[nn.Module] = PastPresentDecoder) -> OnnxSignature:
    """How `model` (the captured model, or a copy of it holding other weights) is exported: for
    decoder LMs the model under `captured.loaded.module`'s architecture, wrapped by `decoder` in
    the KV-cache convention above; otherwise the captured module's own signature."""
    if captured.loaded.task == "causal-lm":
        return _decoder_signature(captured, captured.loaded.module if model is None else model, decoder)
    return _module_signature(captured, captured.module if model is None else model)


def _let_go_of_weights(graph) -> None:
    """Once saved, the exported graph drops its references to the module's weight tensors. The graph
    outlives the export (onnxscript 0.7.2's rewrite rules keep the last graph they matched, in
    SimplePatternMatcher._graph), and onnx-ir keeps the inputs the exporter turned into initializers
    in the inputs' reference counter at a count of zero, each still holding its tensor: for MNN's
    rounded copy of a 1B model, 4.6 GiB held through the smoke."""
    for value in (*graph.initializers.values(), *getattr(graph.inputs, "_ref_counter", ())):
        value.const_value = None


def export_onnx(signature: OnnxSignature, attention_module: nn.Module, opset: int, *, weights_dir: Path):
    """torch.onnx.export (dynamo) of the signature's module: the onnx.ModelProto, its I/O named as
    the signature says. `attention_module` is the model whose attention is written as grouped
    query attention while it is traced (a decoder wrapper may write it otherwise for its call).
    The weights are written in `weights_dir`, one tensor at a time, and the protobuf refers to
    them (onnx's numpy_helper.to_array reads one with the folder as base_dir): it holds no weight
    bytes, so a model past 2 GiB can be rewritten."""
    import onnx

    # its progress lines go to stderr (stdout is for --json)
    with grouped_query_attention(attention_module), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(signature.module, signature.args, kwargs=signature.kwargs or None, dynamo=True,
                                    dynamic_shapes=signature.dynamic_shapes, input_names=signature.input_names,
                                    output_names=signature.output_names, opset_version=opset, verbose=False)
    path = weights_dir / "exported.graph"
    program.save(path, external_data=True)
    _let_go_of_weights(program.model.graph)
    del program  # the exporter's own folded copies of the weights go with it
    model = onnx.load(path, load_external_data=False)
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if names != (signature.input_names, signature.output_names):
        raise RuntimeError(f"exported I/O names {names} differ from {signature.input_names}, {signature.output_names}")
    return model


def _innermost(node, record: str) -> str | None:
    """The innermost nn.Module a node was traced in, by class (_CLASSES) or by path in the exported
    module (_SCOPES): the entry before the aten op."""
    for prop in node.metadata_props:
        if prop.key == record:
            entries = [c.strip(" '\"") for c in prop.value.strip("[]").split(",")]
            return entries[-2] if len(entries) >= 2 else None
    return None


def module_class(node) -> str | None:
    return _innermost(node, _CLASSES)


def class_names(module, kind: type) -> set[str]:
    """The qualified names of `module`'s submodule classes that are `kind` or subclass it (e.g.
    Gemma's scaled word embedding), as the trace records name them."""
    return {f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules() if isinstance(m, kind)}


def weight_nodes(model, op_type: str, module_classes: set[str]) -> dict[str, str]:
    """{name: layer path} of the `op_type` nodes traced directly inside one of `module_classes`
    whose weight is an initializer (other constant-weight nodes stay as they are). Layer paths are
    module names in the exported module (`model.encoder.layer.0.attention.self.value`)."""
    initializers = {t.name for t in model.graph.initializer}
    weight_input = 1 if op_type == "MatMul" else 0
    return {node.name: _innermost(node, _SCOPES) for node in model.graph.node
            if node.op_type == op_type and node.input[weight_input] in initializers
            and module_class(node) in module_classes}
