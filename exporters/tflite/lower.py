"""TFLite lowering: litert_torch conversion with LiteRT's LLM signatures (prefill_<N> / decode,
KV cache passed in and out) or one serving_default signature, int4 blockwise weights with
ai_edge_quantizer after conversion (a decoder LM's on the offset grid: offset_grid.py), and
tflite-support metadata with the tokenizer packed inside."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import mmap
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import torch

from edgepack import __version__
from edgepack.errors import BackendError, InputError
from edgepack.exporters.attention import grouped_query_attention
from edgepack.exporters.capture import quantized_reference
from edgepack.exporters.decoder import ExplicitCacheLM
from edgepack.exporters.lowering import Lowered, Lowering, Step, run_steps
from edgepack.exporters.tflite import BACKEND
from edgepack.exporters.tflite.metadata import ModelDoc, TensorDoc, write_metadata
from edgepack.exporters.tflite.offset_grid import Split, split_layers, store_codes
from edgepack.exporters.tflite.options import DEFAULT_PREFILL_LEN, Options
from edgepack.exporters.tflite.weights import (
    fold_multipliers,
    folded_layers,
    grid_for,
    layer_ops,
    layer_storage,
    nonzero_weight_scales,
    operator_of,
    quantized_tables,
)
from edgepack.exporters.weights import (
    NormAffine,
    fake_quantize,
    float32_weight_bytes,
    int8_per_row,
    linears_fed_by_norms,
    too_large_for_memory,
    too_large_for_weights_folder,
    weight_only_reference,
)
from edgepack.quant import QuantSpec, WeightQuant
from edgepack.rss import machine_memory_bytes, released_pages
from edgepack.stages import CapturedModel, KvCache, MethodSpec, QuantRecord, RuntimeRecord, TensorSpec

MODEL_FILE = BACKEND.artifact
LITERTLM_FILE = "tflite/model.litertlm"
FLOAT_FILE = "float.tflite"  # the converter's, in the lowering's folder until quantized
# The lowering's folder at its largest per byte of float32 weights: the converter's float .tflite
# (1.03x at Llama-3.2-1B's shape), deleted before the offset grid's saved weights (at most 1x) are written.
WEIGHTS_FOLDER_PER_WEIGHT_BYTE = 1.1
BLOCK_SIZES = (32, 64, 128, 256)  # ai_edge_quantizer's blockwise granularities
# The export's peak memory per byte of the model's float32 weights, measured by bench.scale
# (2026-12-05, random Llamas, default options). Under a flatbuffer's 2 GiB the converter builds
# the float model in memory, growing it as it goes: 4.57x at SmolLM2-135M's shape, 3.85x at 360M's.
# Past it the weights go to the file as they are written: 2.11x at Llama-3.2-1B's, the peak in
# storing the offset grid's codes (it was 3.62x when the converter returned the model as bytes,
# 7x before that, and the model was killed at 23.4 GB on 24 GiB).
FLATBUFFER_LIMIT = 2 ** 31
CONVERSION_MEMORY_PER_WEIGHT_BYTE = {"in memory": 4.6, "written as it goes": 2.5}


def refusal(loaded, quant: QuantSpec) -> str | None:
    """Why this machine cannot convert `loaded` (it would need more memory than it grants, or more
    free disk for the lowering's folder than TMPDIR has), or None."""
    in_memory = float32_weight_bytes(loaded.module) < FLATBUFFER_LIMIT
    per_weight_byte = CONVERSION_MEMORY_PER_WEIGHT_BYTE["in memory" if in_memory else "written as it goes"]
    return (too_large_for_memory(loaded.module, per_weight_byte, "the TFLite conversion", machine_memory_bytes())
            or too_large_for_weights_folder(loaded.module, WEIGHTS_FOLDER_PER_WEIGHT_BYTE, "the TFLite conversion"))


def _dynamic_update_slice(cache: torch.Tensor, new: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """The cache write as TFLite's DYNAMIC_UPDATE_SLICE (litert_torch's op): a slice update at
    input_pos[0]. A plain slice assignment needs input_pos[0].item(), which litert_torch rejects
    (ConcretizationTypeError on aten._local_scalar_dense)."""
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

    zero = torch.zeros([], dtype=torch.int32)
    return dynamic_update_slice(cache, new, [zero, zero, input_pos[0].to(torch.int32).reshape([]), zero])


@dataclass(frozen=True)
class _Signature:
    name: str
    module: torch.nn.Module
    sample: dict[str, Any]
    dynamic_shapes: Any = None


@dataclass
class _Work(Lowering):
    signatures: list[_Signature] = field(default_factory=list)
    methods: tuple[MethodSpec, ...] = ()
    prefill_lens: tuple[int, ...] = ()
    fixed_dims: dict[str, int] = field(default_factory=dict)  # dynamic dims exported at a fixed length
    norm_fed: dict[str, NormAffine] = field(default_factory=dict)  # linear layers a norm feeds: fold candidates
    layer_ops: dict[str, list[str]] = field(default_factory=dict)  # layer -> scopes of the ops it became
    stored: dict[str, str] = field(default_factory=dict)  # layer -> how the quantized model stores it
    folded_norms: list[str] = field(default_factory=list)  # linear layers the converter folded a norm into
    float_embeddings: list[str] = field(default_factory=list)  # embedding tables the converter left in float
    float_model: bytes | mmap.mmap = b""  # the converter's (mapped from its file), until it is quantized
    scratch: Path | None = None  # the lowering's folder: the converter's file, the weights hold_grid wrote over
    float_bytes: int = 0
    model: bytes = b""
    split: Split | None = None  # the layers on the offset grid
    doc: ModelDoc | None = None  # the .tflite's metadata


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32) if t.dtype == torch.int64 else t


def _lm_signatures(work: _Work) -> None:
    captured = work.captured
    facts, max_seq_len = captured.loaded.facts, captured.llm_metadata["get_max_seq_len"]
    work.prefill_lens = work.options.prefill_lens_for(max_seq_len)
    model = captured.loaded.module
    prefill = ExplicitCacheLM(model, facts, max_seq_len, _dynamic_update_slice, logits=False).eval()
    decode = ExplicitCacheLM(model, facts, max_seq_len, _dynamic_update_slice).eval()
    cache = decode.empty_cache()
    cache_specs = tuple(TensorSpec(f"kv_cache_{k}", "float32", tuple(v.shape)) for k, v in cache.items())
    methods = []
    for length in work.prefill_lens:
        sample = {"tokens": torch.zeros(1, length, dtype=torch.int32),
                  "input_pos": torch.arange(length, dtype=torch.int32), "kv_cache": cache}
        work.signatures.append(_Signature(f"prefill_{length}", prefill, sample))
        methods.append(MethodSpec(f"prefill_{length}", (TensorSpec("tokens", "int32", (1, length)),
                                                        TensorSpec("input_pos", "int32", (length,)), *cache_specs),
                                  cache_specs))
    sample = {"tokens": torch.zeros(1, 1, dtype=torch.int32), "input_pos": torch.zeros(1, dtype=torch.int32),
              "kv_cache": cache}
    work.signatures.append(_Signature("decode", decode, sample))
    methods.append(MethodSpec("decode", (TensorSpec("tokens", "int32", (1, 1)), TensorSpec("input_pos", "int32", (1,)),
                                         *cache_specs),
                              (TensorSpec("logits", "float32", (1, 1, facts.vocab_size)), *cache_specs)))
    work.methods = tuple(methods)


def _pad(t: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[axis] = length - t.shape[axis]
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=axis)


def _serving_signature(work: _Work) -> None:
    """The inputs are named after the module's forward parameters (input_ids, attention_mask for
    encoders); litert_torch names a tensor output output_0 (output_i for a tuple).

    An encoder's sequence dimension is fixed (--prefill-len, default min(128, max positions)):
    litert_torch 0.10 cannot convert BERT's arange over a symbolic length (TypeError in its
    int64 -> int32 pass). Apps pad with attention_mask 0, as the host runtime does."""
    captured = work.captured
    [method] = captured.methods
    count = len(captured.example_inputs)
    params = list(inspect.signature(captured.module.forward).parameters.values())[:count]
    if len(params) < count or any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params):
        raise InputError("the module's forward takes *args; TFLite signatures need named inputs",
                         hint="give forward one named parameter per input")
    names = tuple(p.name for p in params)
    sample = {n: _int32(t) for n, t in zip(names, captured.example_inputs)}
    shapes = captured.dynamic_shapes  # per positional input (tuple) or per forward parameter (dict)
    if shapes is not None and not isinstance(shapes, dict):
        shapes = dict(zip(names, shapes))
    fixed = {}
    if captured.loaded.task == "encoder":
        fixed = {dim: max(work.options.prefill_lens or (min(DEFAULT_PREFILL_LEN, hi),)) for dim, (_, hi) in method.dynamic_dims.items()}
        for dim, length in fixed.items():
            if length > method.dynamic_dims[dim][1]:
                raise InputError(f"--prefill-len {length} exceeds the model's {dim} limit {method.dynamic_dims[dim][1]}")
        for spec, name in zip(method.inputs, names):
            for axis, size in enumerate(spec.shape):
                if size in fixed:
                    sample[name] = _pad(sample[name], axis, fixed[size])
        shapes = None
    work.signatures.append(_Signature("serving_default", captured.module, sample, shapes))
    work.fixed_dims = fixed

    def spec(name: str, t: TensorSpec) -> TensorSpec:
        return TensorSpec(name, "int32" if t.dtype == "int64" else t.dtype, tuple(fixed.get(d, d) for d in t.shape))

    inputs = tuple(spec(n, t) for n, t in zip(names, method.inputs))
    outputs = tuple(spec(f"output_{i}", t) for i, t in enumerate(method.outputs))
    dynamic = {d: r for d, r in method.dynamic_dims.items() if d not in fixed}
    work.methods = (MethodSpec("serving_default", inputs, outputs, dynamic),)


def split_offset_grid(work: _Work) -> None:
    """A decoder LM's 4-bit layers go on the offset grid (--tflite-grid offset): each becomes a
    symmetric part and int8 offsets (offset_grid.py), in place until the lowering ends; the spec
    then names the parts, so every later step handles them as layers of their own."""
    if work.options.grid != "offset" or work.captured.loaded.task != "causal-lm":
        return
    work.split = split_layers(work.captured.module, work.quant.layers(work.captured.module))
    work.quant = work.quant.with_overrides({**work.quant.overrides, **work.split.offsets}, work.quant.plan)


def _offsets(work: _Work) -> frozenset[str]:
    """The offset grid's offset layers (int8 weight-only: float inputs, dequantized weights)."""
    return frozenset(work.split.offsets) if work.split else frozenset()


def _exact(work: _Work) -> frozenset[str]:
    """The offset grid's symmetric parts: from the store on (Split.hold_grid) their weights are what
    the .tflite stores."""
    return frozenset(work.split.sources) if work.split else frozenset()


def build_signatures(work: _Work) -> None:
    """LMs: LiteRT's LLM signatures over an explicit-cache wrapper; others: serving_default."""
    (_lm_signatures if work.captured.loaded.task == "causal-lm" else _serving_signature)(work)


def locate_layers(work: _Work) -> None:
    """Which ops of the converted model each quantized layer became, found by weight identity
    (exporters/tflite/weights.py), so that the recipe can store a layer otherwise than its kind."""
    spec, module = work.quant, work.captured.module
    grid_for(spec, module)  # refuse a spec the reference cannot follow before quantizing
    if spec.linear:
        fed = linears_fed_by_norms(module, work.captured.example_inputs,
                                   lambda m: "Norm" in type(m).__name__ and not list(m.children()))
        work.norm_fed = {name: affine for name, affine in fed.items() if name not in _exact(work)}  # never folded: store_codes checks
    layers = dict(module.named_modules())
    quantized = {name: layers[name] for name in spec.layers(module)}
    with released_pages(work.float_model):
        work.layer_ops = layer_ops(work.float_model, quantized, work.norm_fed, fold_multipliers(work.captured))


def record_reference(work: _Work) -> None:
    """Weights fake-quantized on ai_edge_quantizer's grid, each layer as the spec stores it; with
    the dynamic recipe each linear's input is also fake-quantized to int8 per token, as the LiteRT
    kernels do at run time (the int4 blockwise and the int8 per-channel kernels alike; not the
    offset grid's weight-only offsets). Where the
    converter folded a norm's affine into a linear layer before quantizing (read back from the
    quantized model: exporters/tflite/weights.py), the reference folds it the same way; an
    embedding table the converter folded into a float constant (no EMBEDDING_LOOKUP holds it)
    stays float in the reference too, whatever the spec says for it."""
    spec, captured = work.quant, work.captured
    grid, layers = grid_for(spec, captured.module), dict(captured.module.named_modules())

    def quantized(name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in _exact(work):
            return weight
        wq = spec.for_layer(name, layers[name])
        return fake_quantize(weight, wq, grid(wq.bits))

    folded = {}
    if spec.linear:
        weights = {name: layers[name].weight.detach() for name in work.norm_fed}
        folded = folded_layers(work.model, work.norm_fed, weights, quantized, fold_multipliers(captured))
    work.folded_norms = sorted(folded)
    if spec.embedding:
        tables = {name: layer.weight.detach() for name, layer in layers.items() if isinstance(layer, torch.nn.Embedding)}
        work.float_embeddings = sorted(set(tables) - quantized_tables(work.model, tables, quantized))
    # A planned layer that holds no op of its own (merged into another by the converter) would
    # silently keep its kind's default; only a lookup folded into a float constant may.
    unplaced = sorted(set(spec.overrides) - set(work.stored) - set(work.float_embeddings))
    if unplaced:
        raise BackendError("tflite", "reference", f"{len(unplaced)} planned layer(s) hold no op of their own in the "
                           f"converted model, so their storage cannot follow the plan: {', '.join(unplaced[:5])}",
                           hint="export with --mixed-precision off, or report the model: the converter merged these layers")
    module = weight_only_reference(captured.module, spec, grid, folded,
                                   keep_float=frozenset(work.float_embeddings) | _exact(work))
    if spec.linear is not None and spec.dynamic_int8_activations:
        weight_only = _offsets(work)
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and name not in weight_only:
                layer.register_forward_pre_hook(lambda _, args: (int8_per_row(args[0]),))
    work.reference = quantized_reference(module, captured)


def convert(work: _Work) -> None:
    import litert_torch

    converter = litert_torch.Converter()
    for sig in work.signatures:
        converter.signature(sig.name, sig.module, sample_kwargs=sig.sample, dynamic_shapes=sig.dynamic_shapes)
    # A decoder LM's weights reach the converter by reference (litert-torch's lightweight
    # conversion): its MLIR then holds no two more copies of them, 2.7 GiB at SmolLM2-360M's shape
    # (sampled). The graph is the same: on SmolLM2-135M's shape every op, shape, constant and
    # option matched, only tensor names differ (2026-12-05). Encoders keep the default, whose
    # converter folds fixed-length lookups into constants (exporters/tflite/weights.py).
    lightweight = work.captured.loaded.task == "causal-lm"
    # Written to a file and mapped, not returned as bytes: the converter's flatbuffer and its copy
    # into Python were two float copies of the model at once (16.5 GiB at Llama-3.2-1B's shape).
    work.scratch = Path(tempfile.mkdtemp(prefix="edgepack-tflite-"))  # in the run's folder (scratch.py)
    path = work.scratch / FLOAT_FILE
    # its progress log goes to stderr (stdout is for --json)
    with grouped_query_attention(work.captured.loaded.module), contextlib.redirect_stdout(sys.stderr):
        converter.convert(lightweight_conversion=lightweight).export(str(path))
    with path.open("rb") as f:
        work.float_model = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    work.float_bytes = len(work.float_model)


def _granularity(wq: WeightQuant):
    from ai_edge_quantizer import qtyping

    if wq.group_size is None:
        return qtyping.QuantGranularity.CHANNELWISE
    if wq.group_size not in BLOCK_SIZES:
        raise InputError(f"--group-size {wq.group_size}: ai_edge_quantizer's blocks are {', '.join(map(str, BLOCK_SIZES))}",
                         hint="choose one of those for --target tflite")
    return getattr(qtyping.QuantGranularity, f"BLOCKWISE_{wq.group_size}")


def quantize(work: _Work) -> None:
    """Dynamic-range recipe: int weights (blockwise for int4) on FULLY_CONNECTED and
    EMBEDDING_LOOKUP, each kind as the spec says, and each layer stored otherwise (mixed
    precision) by its own ops' scopes, which a later config overrides. The quantizer stores
    identical quantized weights once (tied embeddings, and the constants each signature
    carries), which is why it runs after conversion."""
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager

    spec, module = work.quant, work.captured.module
    recipe = recipe_manager.RecipeManager()
    defaults = {"FULLY_CONNECTED": spec.linear, "EMBEDDING_LOOKUP": spec.embedding}
    for op, wq in defaults.items():
        if wq is not None:
            recipe.add_dynamic_config(regex=".*", operation_name=getattr(qtyping.TFLOperationName, op),
                                      num_bits=wq.bits, granularity=_granularity(wq))
    layers = dict(module.named_modules())
    for name, wq in spec.layers(module).items():
        op = operator_of(layers[name])
        if wq != defaults[op]:
            # the offset grid's offsets are weight-only: their products take the block sums in float
            add = recipe.add_weight_only_config if name in _offsets(work) else recipe.add_dynamic_config
            for scope in work.layer_ops.get(name, ()):  # a scope names one op: tensor names are unique
                add(regex=f"^{re.escape(scope)}$", operation_name=getattr(qtyping.TFLOperationName, op),
                    num_bits=wq.bits, granularity=_granularity(wq))
    if not (spec.linear or spec.embedding):
        work.model, work.float_model = bytes(work.float_model), b""
        return
    # it prints its size report; stdout is for --json
    with released_pages(work.float_model), contextlib.redirect_stdout(sys.stderr):
        result = quantizer.Quantizer(work.float_model, recipe.get_quantization_recipe()).quantize()
    work.float_model = b""  # no later step reads it
    (work.scratch / FLOAT_FILE).unlink()
    work.model = nonzero_weight_scales(result.quantized_model)
    _check_stored(work)


def store_offset_grid(work: _Work) -> None:
    if work.split:
        # the eager parts become what the .tflite stores, for the reference
        work.model = store_codes(work.model, work.layer_ops, work.split.hold_grid(work.scratch))


def _check_stored(work: _Work) -> None:
    """Read back how the quantized model stores each located layer; any that departs from the
    spec is a failure. Layers no op holds of its own (a pooler the outputs do not use, a lookup
    folded into a constant) are not in `stored`."""
    wrong = []
    for name, found in layer_storage(work.model, work.layer_ops).items():
        wq = work.quant.for_layer(name, work.captured.module.get_submodule(name))
        work.stored[name] = ", ".join(sorted(s.describe() if s else "float" for s in found))
        if found != {wq}:
            wrong.append(f"{name} is stored {work.stored[name]}, not {wq.describe()}")
    if wrong:
        raise BackendError("tflite", "quantize", f"{len(wrong)} layer(s) not stored as planned: {'; '.join(wrong[:5])}",
                           hint="report this with the model: ai_edge_quantizer did not follow the recipe")


_TENSOR_TEXT = {
    "tokens": "token ids, int32 [1, T]; a prefill signature takes exactly its length (pad the rest)",
    "input_pos": "the position of each token in the sequence, int32 [T]",
    "logits": "next-token logits at the last position, float32 [1, 1, vocab]",
    "input_ids": "token ids, int32 [1, T]",
    "attention_mask": "1 for real tokens, 0 for padding, int32 [1, T]",
    "last_hidden_state": "the encoder's last hidden states, float32 [1, T, hidden]",
}


def _tensor_text(name: str) -> str:
    if name.startswith("kv_cache_"):
        kind, layer = name.removeprefix("kv_cache_").split("_")
        return (f"layer {layer} {'keys' if kind == 'k' else 'values'} cache [1, kv_heads, max_seq_len, head_dim]: "
                "zeros at the start, then the previous call's output")
    return _TENSOR_TEXT.get(name, name)


def _subgraph0_names(model: bytes) -> tuple[list[str], list[str]]:
    """Names of subgraph 0's inputs and outputs in the subgraph's own order (what the schema's
    one SubgraphMetadata must follow), from the signature that maps to it."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(model, 0)
    graph = m.subgraphs[0]
    [sig] = [s for s in m.signatureDefs if s.subgraphIndex == 0]
    by_index = {t.tensorIndex: t.name.decode() for t in sig.inputs + sig.outputs}
    return [by_index[i] for i in graph.inputs], [by_index[i] for i in graph.outputs]


def _facts(work: _Work) -> dict:
    loaded, meta = work.captured.loaded, work.captured.llm_metadata
    tok = loaded.tokenizer
    return {
        "edgepack_version": __version__,
        "task": loaded.task,
        "tokenizer": None if tok is None else tok.stop_facts(),
        "generation": {"max_seq_len": meta["get_max_seq_len"], "prefill_lens": list(work.prefill_lens)} if meta else None,
        "signatures": {m.name: m.as_dict() for m in work.methods},
    }


def _license(source: str) -> str:
    """The `license:` of the model card's front matter, when the source directory has one."""
    card = Path(source) / "README.md"
    if card.is_file():
        lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
        if lines and lines[0].strip() == "---":
            for line in lines[1:]:
                if line.strip() == "---":
                    break
                if line.startswith("license:"):
                    return line.removeprefix("license:").strip()
    return "unknown: see the source model"


def add_metadata(work: _Work) -> None:
    loaded = work.captured.loaded
    inputs, outputs = _subgraph0_names(work.model)
    weights = hashlib.sha256("".join(h for _, h in loaded.weight_files).encode()).hexdigest()[:16]
    tok = loaded.tokenizer
    signatures = ", ".join(m.name for m in work.methods)
    work.doc = ModelDoc(
        name=loaded.name,
        version=f"weights {weights}" if loaded.weight_files else f"edgepack {__version__}",
        description=(f"{loaded.task} model from {Path(loaded.source).name}, exported by edgepack {__version__} "
                     f"({work.quant.scheme} weights). Signatures: {signatures}. Tensor metadata describes the first "
                     f"signature; edgepack.json describes every signature and the tokenizer."),
        author=f"exported by edgepack {__version__}; see the source model for its authors",
        license=_license(loaded.source),
        inputs=tuple(TensorDoc(n, _tensor_text(n)) for n in inputs),
        outputs=tuple(TensorDoc(n, _tensor_text(n)) for n in outputs),
        facts=_facts(work),
        files=tok.file_bytes() if tok else {},
    )
    work.files[MODEL_FILE] = write_metadata(work.model, work.doc)


def write_litertlm(work: _Work) -> None:
    """--tflite-bundle litertlm: the same model with the tokenizer and LLM metadata for LiteRT-LM.
    Its .tflite does not pack the tokenizer files: the .litertlm holds the tokenizer in its own
    section (3.5 MB less for SmolLM2-135M's tokenizer.json, stored twice until 2026-12-06)."""
    if work.options.bundle != "litertlm":
        return
    captured = work.captured
    tok = captured.loaded.tokenizer
    from edgepack.exporters.tflite.litertlm import build_litertlm

    work.files[LITERTLM_FILE] = build_litertlm(
        write_metadata(work.model, replace(work.doc, files={})), tok.directory, tok.files,
        bos_id=tok.bos_id, eos_ids=tok.eos_ids,
        max_seq_len=captured.llm_metadata["get_max_seq_len"], chat_template=tok.chat_template,
        name=captured.loaded.name)


STEPS: tuple[Step, ...] = (
    Step("offset grid", split_offset_grid),
    Step("signatures", build_signatures),
    Step("convert", convert),
    Step("locate layers", locate_layers),
    Step("quantize", quantize),
    Step("store codes", store_offset_grid),
    Step("reference", record_reference),  # reads back what the converter did to the weights
    Step("metadata", add_metadata),
    Step("litertlm", write_litertlm),
)


def lower(captured: CapturedModel, quant: QuantSpec, options: Options,
          on_step: Callable[[str], None] | None = None) -> Lowered:
    if options.bundle == "litertlm" and (captured.loaded.task != "causal-lm" or captured.loaded.tokenizer is None):
        raise InputError("--tflite-bundle litertlm is for decoder LMs with a tokenizer",
                         hint=f"{captured.loaded.source} is a {captured.loaded.task}")
    work = _Work(captured, quant, options)
    try:
        run_steps(BACKEND.name, STEPS, work, on_step)
    finally:
        work.float_model = b""
        try:
            if work.split:
                work.split.restore()  # the capture is every backend's
        finally:
            if work.scratch:
                shutil.rmtree(work.scratch, ignore_errors=True)
    on_grid = "offset" if work.split and work.split.sources else "symmetric"
    return Lowered(
        files=dict(work.files),
        methods=work.methods,
        quantization=QuantRecord(quant.describe(), f"ai-edge-quantizer {version('ai-edge-quantizer')}",
                                 {"recipe": "dynamic range (int weights, activations quantized at run time)"
                                  if quant.linear or quant.embedding else "none",
                                  **({"grid": on_grid} if quant.scheme == "int4" else {})}),
        # the offset grid counted as the other backends count it (an fp16 offset a block); the .tflite stores int8
        ideal_bytes=quant.ideal_bytes(captured.module, offsets=lambda wq: on_grid == "offset" and wq.bits == 4
                                      and wq.group_size is not None),
        runtime=RuntimeRecord("litert", version("ai-edge-litert"), {
            "converter": f"litert-torch {version('litert-torch')}",
            "signatures": [m.name for m in work.methods],
            "prefill_lens": list(work.prefill_lens),
            "fixed_dims": work.fixed_dims,
            "float_bytes": work.float_bytes,
            "quantized_bytes": len(work.model),
            "folded_norms": work.folded_norms,
            "float_embeddings": work.float_embeddings,
            "stored_weights": work.stored,
            **({"litertlm": LITERTLM_FILE} if LITERTLM_FILE in work.files else {}),
            **({"tokenizer": "the tokenizer files packed in the .tflite (associated files, also under tokenizer/); "
                         "LiteRT-LM reads the copy inside the .litertlm"}
               if captured.loaded.tokenizer else {}),
        }),
        reference=work.reference,
        kv_cache=KvCache("float32", "static"),
    )
