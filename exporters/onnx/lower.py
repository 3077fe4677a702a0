"""ONNX lowering for ONNX Runtime (Mobile): torch.onnx.export(dynamo=True) of the captured model,
int4 block-wise weights as MatMulNBits (linear layers) and GatherBlockQuantized (embeddings): on
the offset grid (each block its own min..max, the symmetric codes plus a per-block offset term;
the default) or on onnxruntime's symmetric grid (--onnx-grid symmetric), int8 per-channel weights
(mixed precision's overrides, or --quant int8) as the same two ops with bits 8, metadata_props,
and for decoder LMs the KV cache as inputs and outputs with onnxruntime-genai's names plus a
genai_config.json beside the model. The exported graph's float weights stay in a temporary folder
(`_Work.folder`) until they are quantized, so a model past protobuf's 2 GiB exports as a small one
does."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgepack import __version__
from edgepack.errors import InputError
from edgepack.exporters.capture import quantized_reference
from edgepack.exporters.lowering import Lowered, Lowering, Step, run_steps
from edgepack.exporters.onnx import BACKEND
from edgepack.exporters.onnx import fusions as onnx_fusions
from edgepack.exporters.onnx import graph as onnx_graph
from edgepack.exporters.onnx import metadata as onnx_metadata
from edgepack.exporters.onnx.group_query_attention import GroupQueryAttentionDecoder
from edgepack.exporters.onnx.options import Options
from edgepack.exporters.onnx_capture import (
    PAST,
    PRESENT,
    OnnxSignature,
    class_names,
    export_onnx,
    onnx_signature,
    weight_nodes,
)
from edgepack.exporters.weights import (
    Rounding,
    by_row_slices,
    quantize_groups,
    quantize_min_max,
    too_large_for_memory,
    too_large_for_weights_folder,
    weight_only_reference,
)
from edgepack.quant import QuantSpec, WeightQuant
from edgepack.rss import machine_memory_bytes
from edgepack.stages import CapturedModel, KvCache, QuantRecord, RuntimeRecord

MODEL_FILE = BACKEND.artifact
GENAI_CONFIG = "onnx/genai_config.json"
OPSET = 21  # int4 tensors (GatherBlockQuantized's data) need opset 21 / IR 10
# The export's peak memory per byte of the model's float32 weights: 2.28x on a Llama-3.2-1B-shaped
# model (bench.scale, 2026-12-04; the float weights stay in files while the graph is rewritten),
# rounded up. Smaller models add a fixed ~1.5 GB of Python, torch and onnxruntime.
EXPORT_MEMORY_PER_WEIGHT_BYTE = 2.5
# The weights folder's size per byte of float32 weights: the exported weights, the stacked q/k/v
# and gate/up copies, and a tied table's transpose: 1.73x on the Llama-3.2-1B shape (7.95 GiB).
WEIGHTS_FOLDER_PER_WEIGHT_BYTE = 2.0
# MatMulNBits accuracy_level 4: activations quantized to int8 per block at run time (the fast
# path on ARM and x86 CPUs); 0: fp32 compute on the int4 weights.
INT8_COMPUTE = 4


def rounding(bits: int) -> Rounding:
    """onnxruntime's symmetric grid for MatMul weights (MLAS BlockwiseQuantizer::range2scale):
    scale = the group's value of largest magnitude / -2^(bits-1), q in [-2^(bits-1), 2^(bits-1) - 1],
    ties rounded up; edgepack writes the blocks (graph.store_int4_blocks, store_int8_per_channel),
    linears and tables alike. int4 block scales are stored fp16 (onnxruntime's quantizer kept
    float32: half a bit a weight more), int8 row scales float32."""
    half = 2 ** (bits - 1)
    return Rounding(-half, half - 1, float(half), scale_dtype=torch.float16 if bits == 4 else None,
                    signed_scale=True, half_up=True)


def symmetric_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, None]:
    """The symmetric grid (--onnx-grid symmetric, rounding(4)) as graph.store_int4_blocks stores
    it: codes q in 0..15 (MatMulNBits' zero point 8 implied), fp16 scales, no offsets."""
    q, scale = by_row_slices(quantize_groups, torch.from_numpy(weight), WeightQuant(bits=4, group_size=block), rounding(4))
    rows, cols = weight.shape
    return (q.reshape(rows, cols) + 8).to(torch.uint8).numpy(), scale.reshape(rows, -1).to(torch.float16).numpy(), None


# The offsets' own grid: int8 per row, -127..127, a float32 scale per row. The rows' scales stay
# float32: a row of small weights has small offsets, whose scale fp16 would hold only as a subnormal.
OFFSET_ROUNDING = Rounding.symmetric(8, narrow=True)


def offset_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The offset grid (weights.quantize_min_max, 4 bits, scales in fp16) as
    graph.store_int4_blocks stores it: codes q in 0..15, fp16 scales, and the offsets
    minimum + 8·scale as int8 codes [out, blocks] with one float32 scale per row [out, 1], so that
    w = scale·(q - 8) + offset_code·row_scale with MatMulNBits' implied zero point 8. An int8
    offset a block is 4.75 bits a weight where fp16 offsets took 5; on the real SmolLM2-135M the
    int8 rows cost nothing measurable (the ExecuTorch and TFLite grids store them so)."""
    q, scale, minimum = by_row_slices(quantize_min_max, torch.from_numpy(weight), 4, block, torch.float16)
    rows, cols = weight.shape
    offset_codes, offset_scales = quantize_groups((minimum + 8 * scale).reshape(rows, -1),
                                                  WeightQuant(bits=8, group_size=None), OFFSET_ROUNDING)
    return (q.reshape(rows, cols).to(torch.uint8).numpy(), scale.reshape(rows, -1).to(torch.float16).numpy(),
            (offset_codes.reshape(rows, -1).to(torch.int8).numpy(), offset_scales.reshape(rows, 1).numpy()))


@dataclass(frozen=True)
class OffsetWeight:
    """A weight on the offset grid as the artifact computes with it: codes q - 8 [out, in] (int8,
    q in 0..15), per block fp16 scales, and the offsets [out, blocks] as the graph's constant
    folding makes them, int8 codes times their row's scale in float32."""

    centered: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    block: int

    @classmethod
    def of(cls, weight: torch.Tensor, block: int) -> "OffsetWeight":
        q, scale, (offset_codes, offset_scales) = offset_blocks(weight.detach().float().numpy(), block)
        offsets = torch.from_numpy(offset_codes).float() * torch.from_numpy(offset_scales)
        return cls(torch.from_numpy(q.astype(np.int8) - 8), torch.from_numpy(scale).float(), offsets, block)

    def symmetric(self) -> torch.Tensor:
        """scale·(q - 8) [out, in]: MatMulNBits' dequantized weight (one float temporary, scaled in place)."""
        rows, cols = self.centered.shape
        weight = self.centered.float()
        weight.view(rows, -1, self.block).mul_(self.scales.unsqueeze(-1))
        return weight


def offset_parts(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the artifact computes with for a weight on the offset grid: the symmetric part
    [out, in] and the offsets [out, blocks]."""
    stored = OffsetWeight.of(weight, block)
    return stored.symmetric(), stored.offsets


def _int8_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 per-channel codes of a [out, in] weight and each row's scale, on rounding(8): the
    codes and scales the reference's fake_quantize multiplies. (onnxruntime has no int8
    per-channel MatMul quantizer: MatMulNBits' blocks stop at 256. Its 8-bit block quantizer,
    quantize_matmul_8bits, rounds the same grid but as roundf(w * (1/s) + 128) in float32, which
    lands on the other side of a tie about once in 10^5 weights; storing the reference's own
    rounding keeps the artifact exactly its reference.)"""
    q, scale = quantize_groups(torch.from_numpy(weight), WeightQuant(bits=8, group_size=None), rounding(8))
    return q.reshape(weight.shape).to(torch.int8).numpy(), scale.reshape(-1).numpy()


# How each kind of stored layer lands in the graph (the manifest's quantization.ops).
STORED_AS = {
    (4, "linear"): "MatMulNBits bits=4 block_size={block}, fp16 scales (edgepack, onnxruntime's symmetric grid)",
    (4, "embedding"): "GatherBlockQuantized bits=4 block_size={block}, fp16 scales (edgepack, onnxruntime's symmetric grid)",
    (8, "linear"): "MatMulNBits bits=8, one scale per output channel repeated over its 16..256-wide blocks (edgepack)",
    (8, "embedding"): "GatherBlockQuantized bits=8 uint8, one block (one scale) per row (edgepack)",
}
STORED_AS_OFFSET = {
    "linear": "MatMulNBits bits=4 block_size={block} + a per-block offset term, int8 offsets with a float32 scale per row (edgepack offset grid)",
    "embedding": "GatherBlockQuantized bits=4 block_size={block} + the row's block offsets, int8 with a float32 scale per row (edgepack offset grid)",
}


@dataclass
class _Work(Lowering):
    signature: OnnxSignature | None = None
    model: Any = None  # onnx.ModelProto
    folder: Path | None = None  # where the graph's float weights are kept while it is rewritten (graph.weight_array)
    layers: dict[str, WeightQuant] = field(default_factory=dict)  # layer path -> how it is stored
    linear: dict[str, str] = field(default_factory=dict)  # node name -> layer path: MatMuls of linear layers
    embedding: dict[str, str] = field(default_factory=dict)  # Gathers of embedding tables
    float_bytes: int = 0
    counts: dict = field(default_factory=dict)
    storage: dict[str, dict[str, str]] = field(default_factory=dict)  # WeightQuant.describe() -> {kind: ops}


def refusal(loaded, quant: QuantSpec) -> str | None:
    """Why this machine cannot export `loaded` to ONNX (it would need more memory than it grants,
    or more free disk for the weights folder than TMPDIR has), or None."""
    return (too_large_for_memory(loaded.module, EXPORT_MEMORY_PER_WEIGHT_BYTE, "the ONNX export", machine_memory_bytes())
            or too_large_for_weights_folder(loaded.module, WEIGHTS_FOLDER_PER_WEIGHT_BYTE, "the ONNX export"))


def check_scheme(work: _Work) -> None:
    """What the two ops store: int4 in blocks of 16 .. 256 (MatMulNBits and GatherBlockQuantized,
    on either --onnx-grid), or int8 per channel (MatMulNBits' 8-bit blocks, so a linear layer's
    input width must be a multiple of 16). Fail before any slow step."""
    module = work.captured.module
    work.layers = work.quant.layers(module)
    modules = dict(module.named_modules())
    for name, wq in work.layers.items():
        layer = modules[name]
        kind = "linear" if isinstance(layer, nn.Linear) else "embedding"
        if wq.group_size is None:
            if wq.bits != 8 or not wq.symmetric:
                raise InputError(f"--quant {work.quant.scheme}: --target onnx stores per-channel weights as symmetric "
                                 f"int8 only ({name}: {wq.describe()})", hint="use --quant int4 or int8")
            if kind == "linear" and not onnx_graph.matmul_int8_block(layer.in_features):
                raise InputError(f"--quant {work.quant.scheme}: {name} has input width {layer.in_features}; int8 "
                                 "MatMulNBits needs a multiple of 16", hint="use --quant int4 for this model")
        elif wq.bits != 4 or not wq.symmetric or not 16 <= wq.group_size <= 256:
            raise InputError(f"--quant {work.quant.scheme}: onnxruntime's MatMulNBits needs symmetric int4 blocks of "
                             f"16 to 256 weights ({kind} {name}: {wq.describe()})",
                             hint="use --quant int4 --group-size 16|32|64|128|256, int8 or none for --target onnx")


def build_signature(work: _Work) -> None:
    check_scheme(work)
    # A decoder's attention is ONNX Runtime's fused GroupQueryAttention (one node a layer).
    work.signature = onnx_signature(work.captured, decoder=GroupQueryAttentionDecoder)


def _int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """What MatMulNBits does to its input at accuracy_level 4 (MLAS QuantizeARow_CompInt8):
    symmetric int8 per block of `block` values along the last axis, scale max|x| / 127."""
    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // block, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * (amax / 127)).reshape(shape)


def matmul_block(wq: WeightQuant, in_features: int) -> int:
    """The MatMulNBits block a linear layer gets, also its int8 activation block."""
    return wq.group_size or onnx_graph.matmul_int8_block(in_features)


def on_offset_grid(options: Options, wq: WeightQuant) -> bool:
    """Whether a layer stored as `wq` goes on the offset grid (int4 blocks, --onnx-grid offset)."""
    return options.grid == "offset" and wq.bits == 4 and wq.group_size is not None


def _offset_linear(layer: nn.Linear, stored: OffsetWeight, int8_inputs: bool):
    """The layer as the artifact computes it: MatMulNBits on the symmetric part (its input in int8
    blocks at accuracy_level 4) plus the block sums of the float input times the offsets. It holds
    the 4-bit codes and dequantizes them at each call: a float copy of every weight would double a
    large model's memory."""
    block = stored.block

    def forward(x: torch.Tensor) -> torch.Tensor:
        sums = x.reshape(*x.shape[:-1], -1, block).sum(dim=-1)
        y = nn.functional.linear(_int8_blocks(x, block) if int8_inputs else x, stored.symmetric(), layer.bias)
        return y + sums @ stored.offsets.T
    layer.forward = forward


def record_reference(work: _Work) -> None:
    spec = work.quant
    offset = {name: wq for name, wq in work.layers.items() if on_offset_grid(work.options, wq)}
    module = weight_only_reference(work.captured.module, spec, rounding, keep_float=frozenset(offset))
    layers = dict(module.named_modules())
    # All parts from the float weights first: a tied embedding and LM head share one Parameter.
    parts = {name: OffsetWeight.of(layers[name].weight, wq.group_size) for name, wq in offset.items()}
    for name, stored in parts.items():
        layer = layers[name]
        if isinstance(layer, nn.Linear):
            _offset_linear(layer, stored, spec.dynamic_int8_activations)
        else:
            layer.weight = nn.Parameter(stored.symmetric() + stored.offsets.repeat_interleave(stored.block, dim=1),
                                        requires_grad=False)
    if spec.dynamic_int8_activations:
        for name, layer in module.named_modules():
            if isinstance(layer, nn.Linear) and name in work.layers and name not in offset:
                block = matmul_block(work.layers[name], layer.in_features)
                layer.register_forward_pre_hook(lambda _, args, block=block: (_int8_blocks(args[0], block),))
    work.reference = quantized_reference(module, work.captured)


def export(work: _Work) -> None:
    folder = work.folder
    model = export_onnx(work.signature, work.captured.loaded.module, OPSET, weights_dir=folder)
    linear_classes = class_names(work.signature.module, nn.Linear)
    embedding_classes = class_names(work.signature.module, nn.Embedding)
    work.counts["transposes_folded"] = onnx_graph.fold_weight_transposes(model, folder)
    work.counts["gemms_rewritten"] = onnx_graph.linear_gemms_to_matmuls(model, linear_classes, folder)
    # Which nodes are the model's linear and embedding layers is known only from the trace records.
    work.linear = weight_nodes(model, "MatMul", linear_classes)  # other constant-weight nodes stay fp32
    work.embedding = weight_nodes(model, "Gather", embedding_classes)
    onnx_graph.strip_trace_records(model)
    onnx_graph.check_graph(model, folder)
    work.model, work.float_bytes = model, onnx_graph.graph_bytes(model)


def quantize(work: _Work) -> None:
    """Each linear-layer MatMul and embedding Gather stored as spec.for_layer says: int4 blocks by
    store_int4_blocks, on the offset grid or the symmetric one; int8 per channel by
    store_int8_per_channel. MatMuls that read one input and are stored alike are stacked into one
    first, on every grid. A constant-weight MatMul or Gather from elsewhere stays fp32, as in the
    reference."""
    spec, linear, embedding = work.quant, work.linear, work.embedding
    n_linear = sum(isinstance(m, nn.Linear) for m in work.captured.loaded.module.modules())
    work.counts.update(linear_layers=n_linear, linear_matmuls=len(linear), embedding_gathers=len(embedding))
    nodes = {**linear, **embedding}
    if not work.layers:
        return
    stored = {node: work.layers.get(layer) for node, layer in nodes.items()}
    unnamed = sorted(node for node, wq in stored.items() if wq is None)
    if unnamed and spec.overrides:
        raise RuntimeError(f"graph nodes {unnamed[:5]} trace to no quantized layer; their overrides cannot be placed")
    for node in unnamed:  # a uniform spec stores every layer of a kind alike
        stored[node] = spec.linear if node in linear else spec.embedding
    accuracy_level = INT8_COMPUTE if spec.dynamic_int8_activations else 0
    stacks = onnx_graph.stack_shared_input_matmuls(work.model, {n: wq for n, wq in stored.items() if n in linear}, work.folder)
    for members in stacks.values():
        for member in members[1:]:
            del stored[member]
    fused = sum(len(members) - 1 for members in stacks.values())
    by_storage: dict[WeightQuant, list[str]] = {}
    shared = 0  # tied tables the offset grid stored once
    for node, wq in stored.items():
        by_storage.setdefault(wq, []).append(node)
    for wq, group in sorted(by_storage.items(), key=lambda item: item[0].describe()):
        offset_grid = on_offset_grid(work.options, wq)
        work.storage[wq.describe()] = {
            kind: (STORED_AS_OFFSET[kind] if offset_grid else STORED_AS[wq.bits, kind]).format(block=wq.group_size)
            for kind, names in (("linear", linear), ("embedding", embedding)) if any(n in names for n in group)}
        if wq.group_size is None:
            onnx_graph.store_int8_per_channel(work.model, set(group), _int8_rows, accuracy_level, work.folder)
            continue
        blocks = offset_blocks if offset_grid else symmetric_blocks
        shared += onnx_graph.store_int4_blocks(work.model, set(group), lambda w, block=wq.group_size: blocks(w, block),
                                               wq.group_size, accuracy_level, work.folder)
    work.counts["tied_tables_shared"] = shared
    work.counts["linear_matmuls_fused"] = fused
    counts = onnx_graph.op_counts(work.model)
    work.counts.update(matmul_nbits=counts.get("MatMulNBits", 0), gather_block_quantized=counts.get("GatherBlockQuantized", 0),
                       group_query_attention=counts.get("GroupQueryAttention", 0), bits=onnx_graph.quantized_op_bits(work.model))
    if work.counts["matmul_nbits"] != len(linear) - fused:
        raise RuntimeError(f"{len(linear)} linear MatMuls ({fused} fused into others) but {work.counts['matmul_nbits']} "
                           "became MatMulNBits")


def fuse(work: _Work) -> None:
    """Residual norms, head reshapes and the attention's inputs into the fused shapes onnxruntime
    runs in fewer kernels (fusions.py)."""
    work.model, counts = onnx_fusions.fuse_for_onnxruntime(work.model)
    work.counts.update(counts, nodes=len(work.model.graph.node))


def finish(work: _Work) -> None:
    """Shape inference and the checker on the final graph, metadata, and the files."""
    import onnx

    captured = work.captured
    loaded, meta = captured.loaded, captured.llm_metadata
    model = work.model
    # A check only: the inferred value_info is not kept (ONNX Runtime infers its own; it would grow the file).
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx_graph.check_graph(model, work.folder)
    model.producer_name, model.producer_version = "edgepack", __version__
    model.doc_string = f"{loaded.task} model {loaded.name}, exported by edgepack {__version__}"
    generation = {"max_seq_len": meta["get_max_seq_len"], "genai_config": GENAI_CONFIG.split("/")[-1]} if meta else None
    props = onnx_metadata.metadata_props(loaded, work.quant, generation)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    work.files = {f"onnx/{name}": data for name, data in onnx_graph.serialize(model, MODEL_FILE.split("/")[-1], work.folder).items()}
    if loaded.task == "causal-lm":
        config = onnx_metadata.genai_config(loaded.facts, loaded.tokenizer, meta["get_max_seq_len"], MODEL_FILE.split("/")[-1])
        work.files[GENAI_CONFIG] = onnx_metadata.dumps(config)
        # onnxruntime-genai reads the tokenizer from the model's own folder: onnx/ loads as is.
        work.files.update(loaded.tokenizer.file_bytes("onnx/") if loaded.tokenizer else {})


STEPS: tuple[Step, ...] = (
    Step("signature", build_signature),
    Step("reference", record_reference),
    Step("export", export),
    Step("quantize", quantize),
    Step("fuse", fuse),
    Step("finish", finish),
)


def _library(quant: QuantSpec, options: Options) -> str:
    if quant.scheme != "int4":
        return f"edgepack int8 per channel on onnxruntime {version('onnxruntime')} MatMulNBits"
    grid = ("offset grid (weights.quantize_min_max)" if options.grid == "offset"
            else "symmetric grid (onnxruntime's round to nearest, fp16 scales)")
    return f"edgepack {grid} on onnxruntime {version('onnxruntime')} MatMulNBits"


def lower(captured: CapturedModel, quant: QuantSpec, options: Options,
          on_step: Callable[[str], None] | None = None) -> Lowered:
    with tempfile.TemporaryDirectory(prefix="edgepack-onnx-weights-") as folder:
        work = run_steps(BACKEND.name, STEPS, _Work(captured, quant, options, folder=Path(folder)), on_step)
    facts = {
        "converter": f"torch.onnx (dynamo) {torch.__version__}, onnxscript {version('onnxscript')}",
        "opset": OPSET,
        "execution_provider": "CPUExecutionProvider",
        "float_bytes": work.float_bytes,
        "quantized_bytes": sum(len(data) for name, data in work.files.items() if name.startswith(MODEL_FILE)),
        "graph": dict(work.counts),
        "validated": "onnx.checker (full check) after export and after quantization; strict shape inference",
    }
    if captured.loaded.task == "causal-lm":
        facts["kv_cache"] = {"past": list(PAST), "present": list(PRESENT), "layout": "[1, kv_heads, length, head_dim]",
                             "growth": "present = past followed by the new tokens; onnxruntime-genai shares one buffer of "
                                       "the context for both (past_present_share_buffer true)"}
        facts["genai_config"] = GENAI_CONFIG
    return Lowered(
        files=dict(work.files),
        methods=work.signature.methods,
        quantization=QuantRecord(quant.describe(), _library(quant, options),
                                 {**({"grid": options.grid} if quant.scheme == "int4" else {}),
                                  "ops": work.storage or "none",
                                  "accuracy_level": INT8_COMPUTE if quant.dynamic_int8_activations else 0}),
        # the offset grid counted as the other backends count it (an fp16 offset a block); the .onnx stores int8
        ideal_bytes=quant.ideal_bytes(captured.module, offsets=lambda wq: on_offset_grid(options, wq)),
        runtime=RuntimeRecord("onnxruntime", version("onnxruntime"), facts),
        reference=work.reference,
        kv_cache=KvCache("float32", "growing"),
    )
