"""ONNX lowering for ONNX Runtime (Mobile): torch.onnx.export(dynamo=True) of the captured model,
int4 block-wise weights with onnxruntime's own MatMulNBitsQuantizer (MatMulNBits for linear layers,
GatherBlockQuantized for embeddings), metadata_props, and for decoder LMs the KV cache as inputs
and outputs with onnxruntime-genai's names plus a genai_config.json beside the model."""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Callable

import torch
from torch import nn
from torch.export import Dim

from edgepack import __version__
from edgepack.errors import InputError
from edgepack.quant import QuantSpec
from edgepack.stages import Artifact, CapturedModel, MethodSpec, TensorSpec
from edgepack.exporters.capture import quantized_reference
from edgepack.exporters.decoder import ExplicitCacheLM
from edgepack.exporters.steps import Step, run_steps
from edgepack.exporters.weights import Rounding, weight_only_reference
from edgepack.packaging import onnx_graph, onnx_metadata
from edgepack.packaging.onnx_metadata import INPUT_IDS, LOGITS, PAST, POSITION_IDS, PRESENT

MODEL_FILE = "onnx/model.onnx"
GENAI_CONFIG = "onnx/genai_config.json"
OPSET = 21  # int4 tensors (GatherBlockQuantized's data) need opset 21 / IR 10
# MatMulNBits accuracy_level 4: activations quantized to int8 per block at run time (the fast
# path on ARM and x86 CPUs); 0: fp32 compute on the int4 weights.
INT8_COMPUTE = 4


@dataclass(frozen=True)
class Options:
    """ONNX has no options of its own yet; the shared QuantSpec says everything."""


def rounding(bits: int) -> Rounding:
    """onnxruntime's symmetric grid for MatMul weights (MLAS BlockwiseQuantizer::range2scale):
    scale = the group's value of largest magnitude / -2^(bits-1), q in [-2^(bits-1), 2^(bits-1) - 1],
    ties rounded up."""
    half = 2 ** (bits - 1)
    return Rounding(-half, half - 1, float(half), signed_scale=True, half_up=True)


def gather_rounding(bits: int) -> Rounding:
    """The same grid for Gather tables (the quantizer's numpy quant_slice_symmetric), which
    rounds ties to even."""
    half = 2 ** (bits - 1)
    return Rounding(-half, half - 1, float(half), signed_scale=True)


def _append(cache: torch.Tensor, new: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """onnxruntime-genai's growing cache: present = past followed by the new keys or values."""
    return torch.cat([cache, new], dim=2)


class GenaiDecoder(nn.Module):
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


@dataclass
class _Work:
    captured: CapturedModel
    quant: QuantSpec
    module: nn.Module | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    dynamic_shapes: Any = None
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    methods: tuple[MethodSpec, ...] = ()
    reference: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    model: Any = None  # onnx.ModelProto
    linear: list[str] = field(default_factory=list)  # node names: MatMuls of linear layers
    embedding: list[str] = field(default_factory=list)  # Gathers of embedding tables
    other_matmuls: list[str] = field(default_factory=list)  # constant-weight nodes from elsewhere
    other_gathers: list[str] = field(default_factory=list)
    float_bytes: int = 0
    counts: dict = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


def check_scheme(work: _Work) -> None:
    """MatMulNBits and GatherBlockQuantized are block-wise (blocks of 16 .. a power of two);
    GatherBlockQuantized is 4-bit only. Fail before any slow step."""
    for kind, wq in (("linear", work.quant.linear), ("embedding", work.quant.embedding)):
        if wq is None:
            continue
        if wq.group_size is None or wq.group_size < 16 or not wq.symmetric:
            raise InputError(f"--quant {work.quant.scheme}: onnxruntime's MatMulNBits needs symmetric blocks of at "
                             f"least 16 weights ({kind}: {wq.describe()})",
                             hint="use --quant int4 --group-size 16|32|64|128 or --quant none for --target onnx")
        if kind == "embedding" and wq.bits != 4:
            raise InputError(f"--quant {work.quant.scheme}: GatherBlockQuantized (embeddings) is 4-bit only",
                             hint="use --quant int4 for --target onnx")


def _lm_signature(work: _Work) -> None:
    captured = work.captured
    facts, max_seq_len = captured.loaded.facts, captured.llm_metadata["get_max_seq_len"]
    work.module = GenaiDecoder(captured.loaded.module, facts).eval()
    # The example: 3 new tokens after a past of at least 2 (torch.export specializes lengths 0 and
    # 1). With a sliding window shorter than the cache, past + 3 exceeds the window, so the trace
    # takes attention_masks' windowed branch (decided in Python from the example); the windowed
    # mask is also right for shorter lengths, where the window hides nothing.
    window = facts.sliding_window
    past_len = window - 2 if window is not None and 4 <= window < max_seq_len else 2
    cache = (1, facts.n_kv_heads, past_len, facts.head_dim)
    past = {f"{kind}_{i}": torch.zeros(cache) for i in range(facts.n_layers) for kind in "kv"}
    work.args = (torch.zeros(1, 3, dtype=torch.int64), torch.arange(past_len, past_len + 3).unsqueeze(0))
    work.kwargs = {"past": past}
    seq = Dim("sequence_length", min=1, max=max_seq_len - 1)
    past_len = Dim("past_sequence_length", min=0, max=max_seq_len - 1)
    work.dynamic_shapes = {"input_ids": {1: seq}, "position_ids": {1: seq}, "past": {k: {2: past_len} for k in past}}
    work.input_names = [INPUT_IDS, POSITION_IDS, *onnx_metadata.cache_names(facts.n_layers, PAST)]
    work.output_names = [LOGITS, *onnx_metadata.cache_names(facts.n_layers, PRESENT)]

    def kv(name: str, length: str) -> TensorSpec:
        return TensorSpec(name, "float32", (1, facts.n_kv_heads, length, facts.head_dim))

    work.methods = (MethodSpec(
        "forward",
        inputs=(TensorSpec(INPUT_IDS, "int64", (1, "sequence_length")),
                TensorSpec(POSITION_IDS, "int64", (1, "sequence_length")),
                *(kv(n, "past_sequence_length") for n in work.input_names[2:])),
        outputs=(TensorSpec(LOGITS, "float32", (1, 1, facts.vocab_size)),
                 *(kv(n, "total_sequence_length") for n in work.output_names[1:])),
        dynamic_dims={"sequence_length": (1, max_seq_len - 1), "past_sequence_length": (0, max_seq_len - 1),
                      "total_sequence_length": (1, max_seq_len)},
    ),)


def _module_signature(work: _Work) -> None:
    """Encoders and plain modules: the captured module as is, inputs and outputs named as the
    manifest names them (input_ids / attention_mask, input_0 ...; last_hidden_state, output_0 ...)."""
    captured = work.captured
    [method] = captured.methods
    work.module = captured.module
    work.args = tuple(captured.example_inputs)
    work.dynamic_shapes = captured.dynamic_shapes
    work.input_names = [t.name for t in method.inputs]
    work.output_names = [t.name for t in method.outputs]
    work.methods = (method,)


def build_signature(work: _Work) -> None:
    check_scheme(work)
    (_lm_signature if work.captured.loaded.task == "causal-lm" else _module_signature)(work)


def _int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """What MatMulNBits does to its input at accuracy_level 4 (MLAS QuantizeARow_CompInt8):
    symmetric int8 per block of `block` values along the last axis, scale max|x| / 127."""
    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // block, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * (amax / 127)).reshape(shape)


def record_reference(work: _Work) -> None:
    spec = work.quant
    module = weight_only_reference(work.captured.module, spec, rounding, embedding_rounding=gather_rounding)
    if spec.linear is not None and spec.dynamic_int8_activations:
        block = spec.linear.group_size
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.register_forward_pre_hook(lambda _, args: (_int8_blocks(args[0], block),))
    work.reference, work.quality = quantized_reference(module, work.captured)


def export(work: _Work) -> None:
    import onnx

    with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout is for --json
        program = torch.onnx.export(work.module, work.args, kwargs=work.kwargs or None, dynamo=True,
                                    dynamic_shapes=work.dynamic_shapes, input_names=work.input_names,
                                    output_names=work.output_names, opset_version=OPSET, verbose=False)
    model = program.model_proto
    linear_classes = onnx_graph.class_names(work.module, nn.Linear)
    embedding_classes = onnx_graph.class_names(work.module, nn.Embedding)
    work.counts["transposes_folded"] = onnx_graph.fold_weight_transposes(model)
    work.counts["gemms_rewritten"] = onnx_graph.linear_gemms_to_matmuls(model, linear_classes)
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if names != (work.input_names, work.output_names):
        raise RuntimeError(f"exported I/O names {names} differ from {work.input_names}, {work.output_names}")
    # Which nodes are the model's linear and embedding layers is known only from the trace records.
    work.linear, work.other_matmuls = onnx_graph.weight_nodes(model, "MatMul", linear_classes)
    work.embedding, work.other_gathers = onnx_graph.weight_nodes(model, "Gather", embedding_classes)
    onnx_graph.strip_trace_records(model)
    onnx.checker.check_model(model, full_check=True)
    work.model, work.float_bytes = model, model.ByteSize()


def quantize(work: _Work) -> None:
    """onnxruntime's MatMulNBitsQuantizer on the linear-layer MatMuls and the embedding Gathers
    only (a constant-weight MatMul or Gather from elsewhere stays fp32, as in the reference)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    spec, model, linear, embedding = work.quant, work.model, work.linear, work.embedding
    n_linear = sum(isinstance(m, nn.Linear) for m in work.captured.loaded.module.modules())
    work.counts.update(linear_layers=n_linear, linear_matmuls=len(linear), embedding_gathers=len(embedding))
    if spec.linear is None:
        return
    if spec.embedding is not None and spec.embedding.group_size != spec.linear.group_size:
        raise InputError("onnxruntime's quantizer takes one block size for linear layers and embeddings")
    exclude = work.other_matmuls + work.other_gathers + ([] if spec.embedding else embedding)
    config = DefaultWeightOnlyQuantConfig(
        block_size=spec.linear.group_size, is_symmetric=True, bits=spec.linear.bits,
        accuracy_level=INT8_COMPUTE if spec.dynamic_int8_activations else 0, quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul", "Gather") if spec.embedding else ("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
        quantizer.process()
    finally:
        quantizer_log.setLevel(level)
    work.model = quantizer.model.model
    work.counts["tied_tables_shared"] = onnx_graph.share_tied_tables(work.model)
    counts = onnx_graph.op_counts(work.model)
    work.counts.update(matmul_nbits=counts.get("MatMulNBits", 0), gather_block_quantized=counts.get("GatherBlockQuantized", 0))
    if work.counts["matmul_nbits"] != len(linear):
        raise RuntimeError(f"{len(linear)} linear MatMuls but {work.counts['matmul_nbits']} became MatMulNBits")


def finish(work: _Work) -> None:
    """Shape inference and the checker on the final graph, metadata, and the files."""
    import onnx

    captured = work.captured
    loaded, meta = captured.loaded, captured.llm_metadata
    model = work.model
    # A check only: the inferred value_info is not kept (ONNX Runtime infers its own; it would grow the file).
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    model.producer_name, model.producer_version = "edgepack", __version__
    model.doc_string = f"{loaded.task} model {loaded.name}, exported by edgepack {__version__}"
    generation = {"max_seq_len": meta["get_max_seq_len"], "genai_config": GENAI_CONFIG.split("/")[-1]} if meta else None
    props = onnx_metadata.metadata_props(loaded, work.quant, generation)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    work.files = {f"onnx/{name}": data for name, data in onnx_graph.serialize(model, MODEL_FILE.split("/")[-1]).items()}
    if loaded.task == "causal-lm":
        config = onnx_metadata.genai_config(loaded.facts, loaded.tokenizer, meta["get_max_seq_len"], MODEL_FILE.split("/")[-1])
        work.files[GENAI_CONFIG] = onnx_metadata.dumps(config)
        tok = loaded.tokenizer
        # onnxruntime-genai reads the tokenizer from the model's own folder: onnx/ loads as is.
        for name in tok.files if tok else ():
            work.files[f"onnx/{name}"] = (tok.directory / name).read_bytes()


STEPS: tuple[Step, ...] = (
    Step("signature", build_signature),
    Step("reference", record_reference),
    Step("export", export),
    Step("quantize", quantize),
    Step("finish", finish),
)


def lower(captured: CapturedModel, quant: QuantSpec, options: Options,
          on_step: Callable[[str], None] | None = None) -> Artifact:
    work = run_steps("onnx", STEPS, _Work(captured, quant), on_step)
    runtime = {
        "name": "onnxruntime",
        "version": version("onnxruntime"),
        "converter": f"torch.onnx (dynamo) {torch.__version__}, onnxscript {version('onnxscript')}",
        "opset": OPSET,
        "execution_provider": "CPUExecutionProvider",
        "float_bytes": work.float_bytes,
        "quantized_bytes": sum(len(data) for name, data in work.files.items() if name.startswith(MODEL_FILE)),
        "graph": dict(work.counts),
        "validated": "onnx.checker (full check) after export and after quantization; strict shape inference",
    }
    if captured.loaded.task == "causal-lm":
        runtime["kv_cache"] = {"past": list(PAST), "present": list(PRESENT), "layout": "[1, kv_heads, length, head_dim]",
                               "growth": "present = past followed by the new tokens (past_present_share_buffer false)"}
        runtime["genai_config"] = GENAI_CONFIG
    return Artifact(
        backend="onnx",
        platforms=("android", "ios"),
        files=dict(work.files),
        main_file=MODEL_FILE,
        methods=work.methods,
        quantization={**quant.describe(), "library": f"onnxruntime {version('onnxruntime')} MatMulNBitsQuantizer",
                      "ops": "MatMulNBits (linear), GatherBlockQuantized (embedding)" if quant.linear else "none",
                      "accuracy_level": INT8_COMPUTE if quant.dynamic_int8_activations else 0},
        ideal_bytes=quant.ideal_bytes(captured.loaded.module),
        reference_outputs=work.reference,
        runtime=runtime,
        extra={"quality": work.quality},
    )
