"""GGUF lowering for llama.cpp: the decoder's weights under llama.cpp's tensor names (gguf's own
name map), 4-bit layers as Q4_1 or Q4_0 and the plan's 8-bit layers as Q8_0 (gguf's numpy
quantizers, blocks of 32), norms in F32, the architecture's hyperparameters and the tokenizer
(vocabulary, merges, special ids, chat template) in the file's metadata: one self-contained
.gguf, the file llama.cpp's Android and iOS bindings load. --gguf-type Q4_K_M writes the weights
in F32 and hands the file to llama.cpp's own quantizer, which picks each tensor's type.

The reference is the captured model holding exactly the weights the file stores (each one
dequantized by gguf from its stored bytes), so the smoke compares llama.cpp with what it was given."""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgepack import __version__
from edgepack.errors import InputError
from edgepack.exporters.capture import quantized_reference
from edgepack.exporters.gguf import BACKEND
from edgepack.exporters.gguf import runtime as gguf_runtime
from edgepack.exporters.gguf.options import LLAMA_CPP_MIXES, Options
from edgepack.exporters.gguf.vocab import GgufVocab, read_vocab, write_vocab
from edgepack.exporters.lowering import Lowered, Lowering, Step, run_steps
from edgepack.quant import QuantSpec, WeightQuant
from edgepack.stages import CapturedModel, KvCache, QuantRecord, RuntimeRecord

MODEL_FILE = BACKEND.artifact
BLOCK = 32  # every GGUF type edgepack writes quantizes blocks of 32 along a row


@dataclass(frozen=True)
class Arch:
    """A family as llama.cpp knows it: its architecture name, and whether its rotary embedding
    pairs neighbouring dimensions (llama.cpp's LLAMA rope), so q and k rows are permuted from
    Hugging Face's half-split layout, as llama.cpp's own converter does."""

    name: str  # gguf.MODEL_ARCH member
    interleaved_rope: bool


ARCHES = {
    "llama": Arch("LLAMA", interleaved_rope=True),
    "qwen2": Arch("QWEN2", interleaved_rope=False),
    "qwen3": Arch("QWEN3", interleaved_rope=False),
}


def refusal(loaded, quant: QuantSpec) -> str | None:
    """Why this backend cannot take `loaded` at `quant`, or None."""
    reason = _shape_refusal(loaded, quant)
    if reason:
        return reason
    try:
        read_vocab(loaded.tokenizer, loaded.facts.vocab_size)
    except InputError as e:
        return e.message
    return None


def _shape_refusal(loaded, quant: QuantSpec) -> str | None:
    """refusal() but for the tokenizer's vocabulary, which read_vocab checks as it reads it."""
    facts = loaded.facts
    if loaded.task != "causal-lm" or facts is None:
        return f"llama.cpp runs decoder LMs; {loaded.source} is a {loaded.task}"
    if facts.family not in ARCHES:
        return (f"edgepack writes GGUF for the {', '.join(ARCHES)} families; {loaded.source} is {facts.family}")
    rope_type = (facts.rope or {}).get("rope_type", "default")
    if rope_type not in ("default", None):
        return f"rope type {rope_type!r} is not written to GGUF yet (default rope only)"
    if quant.linear and quant.linear.bits == 4 and quant.linear.group_size != BLOCK:
        return f"GGUF's 4-bit types quantize blocks of {BLOCK}; --group-size {quant.linear.group_size} has no GGUF type"
    if loaded.tokenizer is None:
        return "a .gguf carries its tokenizer, and this export has none (drop --no-tokenizer)"
    return None


def _type_refusal(quant: QuantSpec, options: Options) -> str | None:
    if options.type in LLAMA_CPP_MIXES and quant.scheme != "int4":
        return f"--gguf-type {options.type} is a 4-bit mix; --quant {quant.scheme} asks for none (use --quant int4)"
    return None


@dataclass
class _Work(Lowering):
    folder: Path  # a scratch folder for the file (and llama.cpp's quantizer's input)
    arch: Arch | None = None
    vocab: GgufVocab | None = None
    tensors: list[tuple[str, np.ndarray, str]] = field(default_factory=list)  # (gguf name, stored bytes or floats, type)
    hf_names: dict[str, str] = field(default_factory=dict)  # gguf name -> Hugging Face parameter name
    stored: dict[str, torch.Tensor] = field(default_factory=dict)  # HF parameter name -> the weight the file holds
    path: Path | None = None  # the file written
    tokenizer_check: dict = field(default_factory=dict)


def _gguf_type(options: Options, wq: WeightQuant | None) -> str:
    """A layer's GGUF type as edgepack writes it (4-bit layers have blocks of BLOCK: refusal()
    turned away other sizes); F32 throughout where llama.cpp's quantizer chooses afterwards."""
    if wq is None or options.type in LLAMA_CPP_MIXES:
        return "F32"
    return "Q8_0" if wq.bits == 8 else options.type


def _permute_rope_rows(w: np.ndarray, heads: int, *, back: bool = False) -> np.ndarray:
    """Hugging Face's q/k rows (each head's rotary halves) in llama.cpp's order (pairs interleaved),
    or `back`. Works on any row-major array whose first axis is the output rows (float or packed blocks)."""
    split = (heads, w.shape[0] // heads // 2, 2) if back else (heads, 2, w.shape[0] // heads // 2)
    return w.reshape(*split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(work: _Work, name: str) -> int | None:
    """The heads whose rows llama.cpp's rope pairs differently, for an HF q or k weight; else None."""
    if not (work.arch.interleaved_rope and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))):
        return None
    facts = work.captured.loaded.facts
    return facts.n_heads if "q_proj" in name else facts.n_kv_heads


def read_architecture(work: _Work) -> None:
    loaded = work.captured.loaded
    reason = _shape_refusal(loaded, work.quant) or _type_refusal(work.quant, work.options)
    if reason:
        raise InputError(f"gguf: {reason}", hint="leave gguf out of --target")
    work.arch = ARCHES[loaded.facts.family]
    work.vocab = read_vocab(loaded.tokenizer, loaded.facts.vocab_size)


def quantize_tensors(work: _Work) -> None:
    """Each parameter under its llama.cpp name and type; a tied LM head is the embedding's tensor."""
    import gguf

    facts = work.captured.loaded.facts
    hf = work.captured.module.model  # StaticCacheLM wraps the Hugging Face model as .model
    layers = work.quant.layers(work.captured.module)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, work.arch.name), facts.n_layers)
    seen: set[int] = set()
    for name, param in hf.state_dict(keep_vars=True).items():
        if id(param) in seen:  # tied: llama.cpp reads the LM head from token_embd when output is absent
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise InputError(f"gguf: no llama.cpp tensor for {name}",
                             hint=f"the {facts.family} layout has a parameter llama.cpp's {work.arch.name} graph does not read")
        seen.add(id(param))
        weight = param.detach().float().numpy()
        kind = _gguf_type(work.options, layers.get(f"model.{name.rsplit('.', 1)[0]}") if weight.ndim == 2 else None)
        if kind == "F32":
            data = weight
            work.stored[name] = torch.from_numpy(weight)  # read only: record_reference copies it into its own model
        else:
            if weight.shape[-1] % BLOCK:
                raise InputError(f"gguf: {name} rows of {weight.shape[-1]} do not split into blocks of {BLOCK}")
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            data = gguf.quants.quantize(weight, qtype)
            work.stored[name] = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))
        if heads := _rope_heads(work, name):
            data = _permute_rope_rows(data, heads)
        work.tensors.append((target, np.ascontiguousarray(data), kind))
        work.hf_names[target] = name


def record_reference(work: _Work) -> None:
    """The captured model holding the stored weights (tied weights stay one tensor)."""
    module = copy.deepcopy(work.captured.module)
    params = dict(module.model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, weight in work.stored.items():
            params[name].copy_(weight.reshape(params[name].shape))
    work.reference = quantized_reference(module, work.captured)


def write_file(work: _Work) -> None:
    import gguf

    loaded, facts = work.captured.loaded, work.captured.loaded.facts
    config = loaded.module.config.get_text_config()
    kinds = {kind for _, _, kind in work.tensors}
    work.path = work.folder / "model.gguf"
    writer = gguf.GGUFWriter(work.path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, work.arch.name)])
    writer.add_name(loaded.name)
    writer.add_string("general.source.edgepack", f"edgepack {__version__} from {Path(loaded.source).name}")
    writer.add_context_length(facts.max_positions)
    writer.add_embedding_length(facts.hidden_size)
    writer.add_block_count(facts.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(facts.n_heads)
    writer.add_head_count_kv(facts.n_kv_heads)
    writer.add_key_length(facts.head_dim)
    writer.add_value_length(facts.head_dim)
    writer.add_rope_dimension_count(facts.head_dim)
    writer.add_rope_freq_base(float(facts.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(facts.vocab_size)
    writer.add_file_type(_file_type(kinds))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, work.vocab, loaded.tokenizer)
    for name, data, kind in work.tensors:
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        writer.add_tensor(name, data, raw_dtype=None if kind == "F32" else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _file_type(kinds: set[str]) -> int:
    """general.file_type: what most of the file is (llama.cpp prints it; nothing reads it)."""
    import gguf

    for kind in ("Q4_1", "Q4_0", "Q8_0"):
        if kind in kinds:
            return getattr(gguf.LlamaFileType, f"MOSTLY_{kind}")
    return gguf.LlamaFileType.ALL_F32


def quantize_with_llama_cpp(work: _Work) -> None:
    """llama.cpp's quantizer makes its mix from the F32 file; what it stored is read back (each
    tensor dequantized by gguf, q/k rows in Hugging Face's order again) for the reference."""
    import gguf

    mixed = work.folder / f"model-{work.options.type}.gguf"
    gguf_runtime.quantize(work.path, mixed, LLAMA_CPP_MIXES[work.options.type])
    work.path, work.tensors, work.stored = mixed, [], {}
    for t in gguf.GGUFReader(mixed).tensors:
        name = work.hf_names[t.name]
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        values = values.reshape([int(d) for d in reversed(t.shape)])
        if heads := _rope_heads(work, name):
            values = _permute_rope_rows(values, heads, back=True)
        work.tensors.append((t.name, t.data, t.tensor_type.name))
        work.stored[name] = torch.from_numpy(values)


def check_tokenizer(work: _Work) -> None:
    work.tokenizer_check = gguf_runtime.check_embedded_tokenizer(work.path, work.captured.loaded.tokenizer)


PLAN_STEPS: tuple[Step, ...] = (
    Step("architecture", read_architecture),
    Step("quantize", quantize_tensors),
    Step("reference", record_reference),
    Step("write", write_file),
    Step("check tokenizer", check_tokenizer),
)
LLAMA_CPP_STEPS: tuple[Step, ...] = (
    Step("architecture", read_architecture),
    Step("collect weights", quantize_tensors),  # all F32
    Step("write", write_file),
    Step("llama.cpp quantize", quantize_with_llama_cpp),
    Step("check tokenizer", check_tokenizer),
    Step("reference", record_reference),
)

# What the file's 4-bit layers store (the plan's "int4 ... sym" names the planner's grid, not this one).
GRIDS = {"Q4_1": "4-bit layers Q4_1: each block of 32 on its own min..max (fp16 scale and minimum); 8-bit layers Q8_0",
         "Q4_0": "4-bit layers Q4_0: blocks of 32, symmetric, one fp16 scale; 8-bit layers Q8_0",
         "Q4_K_M": "llama.cpp's Q4_K_M mix, each tensor's type chosen by llama.cpp's quantizer (gguf_types); "
                   "the precision plan does not apply"}


def lower(captured: CapturedModel, quant: QuantSpec, options: Options,
          on_step: Callable[[str], None] | None = None) -> Lowered:
    steps = LLAMA_CPP_STEPS if options.type in LLAMA_CPP_MIXES else PLAN_STEPS
    with tempfile.TemporaryDirectory(prefix="edgepack-gguf-") as tmp:
        work = run_steps(BACKEND.name, steps, _Work(captured, quant, options, Path(tmp)), on_step)
        data = work.path.read_bytes()
    counts = Counter(kind for _, _, kind in work.tensors)
    warnings = ()
    if not work.tokenizer_check["passed"]:
        first = work.tokenizer_check["mismatches"][0]
        warnings = (f"llama.cpp's tokenizer (from the .gguf) differs from the model's on "
                    f"{len(work.tokenizer_check['mismatches'])} check(s); first: {first['what']} of {first['text'][:40]!r}",)
    if options.type in LLAMA_CPP_MIXES:
        scheme = {"scheme": quant.scheme, "method": f"llama.cpp's quantizer ({options.type})"}
        library = f"llama.cpp (llama-cpp-python {gguf_runtime.runtime_version()})"
    else:
        scheme, library = quant.describe(), f"gguf {version('gguf')} (numpy quantizers)"
    return Lowered(
        files={MODEL_FILE: data},
        quantization=QuantRecord(scheme, library, {
            "gguf_types": dict(sorted(counts.items())), "gguf_type": options.type, "grid": GRIDS[options.type],
            "activations": "llama.cpp quantizes activations per block of 32 (Q8_0 / Q8_1) for quantized matmuls"}),
        ideal_bytes=sum(data.nbytes for _, data, _ in work.tensors),  # as their types store them, tied once
        runtime=RuntimeRecord("llama.cpp", gguf_runtime.runtime_version(), {
            "architecture": work.arch.name.lower(),
            "tokenizer": {"embedded": f"tokenizer.ggml.* ({work.vocab.model}, pre {work.vocab.pre!r})",
                          "check": work.tokenizer_check}}),
        reference=work.reference,
        warnings=warnings,
        kv_cache=KvCache("float16", "runtime"),
    )
