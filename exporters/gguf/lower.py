"""GGUF lowering for llama.cpp: the decoder's weights under llama.cpp's tensor names (gguf's own
name map), 4-bit layers as Q4_1 or Q4_0 and the plan's 8-bit layers as Q8_0 (gguf's numpy
quantizers, blocks of 32), norms in F32, the architecture's hyperparameters and the tokenizer
(vocabulary, merges, special ids, chat template) in the file's metadata: one self-contained
.gguf, the file llama.cpp's Android and iOS bindings load. --gguf-type Q4_K_M writes the weights
in F32 and hands the file to llama.cpp's own quantizer, which picks each tensor's type.

What differs between families (tensors llama.cpp reads in another layout, hyperparameter keys,
what its graph cannot follow and refusal() turns away) is one row of ARCHES.

The reference is the captured model holding exactly the weights the file stores (each one
dequantized by gguf from its stored bytes), so the smoke compares llama.cpp with what it was given."""

from __future__ import annotations

import copy
import math
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
from edgepack.exporters.decoder import longrope_original_length
from edgepack.exporters.gguf import BACKEND
from edgepack.exporters.gguf import runtime as gguf_runtime
from edgepack.exporters.gguf.options import LLAMA_CPP_MIXES, Options
from edgepack.exporters.gguf.vocab import GgufVocab, read_vocab, write_vocab
from edgepack.exporters.lowering import Lowered, Lowering, Step, run_steps
from edgepack.quant import QuantSpec, WeightQuant
from edgepack.stages import CapturedModel, KvCache, ModelFacts, QuantRecord, RuntimeRecord

MODEL_FILE = BACKEND.artifact
BLOCK = 32  # every GGUF type edgepack writes quantizes blocks of 32 along a row


@dataclass(frozen=True)
class Relayout:
    """Parameters llama.cpp reads in another layout or value than Hugging Face's. `to_file` runs
    before quantizing (GGUF's blocks run along the file's rows); `back` turns values read from the
    file into the Hugging Face module's own, which is what the reference (work.stored) holds."""

    suffixes: tuple[str, ...]  # the Hugging Face parameter names it applies to, by their ending
    to_file: Callable[[np.ndarray, str, ModelFacts], np.ndarray]
    back: Callable[[np.ndarray, str, ModelFacts], np.ndarray]


def _permute_rope_rows(w: np.ndarray, heads: int, *, back: bool = False) -> np.ndarray:
    """Hugging Face's q/k rows (each head's rotary halves) in llama.cpp's order (pairs interleaved), or `back`."""
    split = (heads, w.shape[0] // heads // 2, 2) if back else (heads, 2, w.shape[0] // heads // 2)
    return w.reshape(*split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(name: str, facts: ModelFacts) -> int:
    return facts.n_heads if "q_proj" in name else facts.n_kv_heads


# llama.cpp's LLAMA rope pairs neighbouring dimensions where Hugging Face's rotates halves: q and k
# rows are permuted, as llama.cpp's own converter does.
INTERLEAVED_ROPE = Relayout(("self_attn.q_proj.weight", "self_attn.k_proj.weight"),
                            lambda w, name, facts: _permute_rope_rows(w, _rope_heads(name, facts)),
                            lambda w, name, facts: _permute_rope_rows(w, _rope_heads(name, facts), back=True))
# Gemma's RMSNorm scales by (1 + w), llama.cpp's by the stored weight: the file holds w + 1.
PLUS_ONE_NORMS = Relayout(("norm.weight",), lambda w, *_: w + 1, lambda w, *_: w - 1)
# The logit soft-caps a config can set: its field -> what is capped, and the GGUFWriter method writing it.
SOFT_CAPS = {"attn_logit_softcapping": ("attention logits", "add_attn_logit_softcapping"),
             "final_logit_softcapping": ("final logits", "add_final_logit_softcapping")}


def _gemma_query_scalar(layers_27b: int) -> Callable[[ModelFacts], float]:
    """What llama.cpp's Gemma graphs scale queries by (1/sqrt of it), reading no key for it:
    hidden/heads for the 27B model, which they recognise by its layer count, head_dim otherwise."""
    return lambda facts: facts.hidden_size / facts.n_heads if facts.n_layers == layers_27b else facts.head_dim


@dataclass(frozen=True)
class Arch:
    """A family as llama.cpp's graph for it computes: what the file must say beyond the keys every
    family writes, and what a model may use that the graph can follow (refusal() turns the rest away)."""

    name: str  # gguf.MODEL_ARCH member
    relayouts: tuple[Relayout, ...] = ()
    ffn_length: Callable[[object], int] = lambda config: config.intermediate_size  # from the text config
    layer_norm: bool = False  # LayerNorm (eps: layer_norm_epsilon) instead of RMSNorm (rms_norm_eps)
    sliding_window: bool = False  # the graph reads a window, which layers use it, and their rope base
    soft_caps: dict[str, bool] = field(default_factory=dict)  # SOFT_CAPS field -> capped even when the file sets none
    query_scalar: Callable[[ModelFacts], float] | None = None  # the config's query_pre_attn_scalar must equal it
    reads_output: bool = True  # False: the LM head is always token_embd (an untied head is refused)
    rope_tables: tuple[str, ...] = ()  # rope types whose per-frequency factors the graph reads from tensors (ROPE_TABLES)


LLAMA = Arch("LLAMA", (INTERLEAVED_ROPE,), rope_tables=("llama3", "longrope"))
ARCHES = {
    "llama": LLAMA,
    "mistral": LLAMA,  # as llama.cpp's converter writes it: its LLAMA graph has no sliding window
    "qwen2": Arch("QWEN2"),
    "qwen3": Arch("QWEN3"),
    "phi3": Arch("PHI3", rope_tables=("longrope",)),  # fused qkv_proj and gate_up_proj: gguf's name map makes them attn_qkv and ffn_up
    "gemma2": Arch("GEMMA2", (PLUS_ONE_NORMS,), sliding_window=True, query_scalar=_gemma_query_scalar(46),
                   soft_caps={"attn_logit_softcapping": True, "final_logit_softcapping": True}, reads_output=False),
    "gemma3": Arch("GEMMA3", (PLUS_ONE_NORMS,), sliding_window=True, query_scalar=_gemma_query_scalar(62),
                   soft_caps={"final_logit_softcapping": False}),
    # learned positions; the loader made its Conv1D layers nn.Linear, already [out, in] as the file stores them
    "gpt2": Arch("GPT2", ffn_length=lambda config: config.n_inner or 4 * config.n_embd, layer_norm=True),
}


def _ropes(facts: ModelFacts) -> dict[str | None, dict]:
    """The rope parameters by layer type where the config gives each its own (Gemma 3), else {None: them}."""
    rope = facts.rope or {}
    return {kind: p for kind, p in rope.items() if isinstance(p, dict)} or {None: rope}


def _rope_type(rope: dict) -> str:
    return rope.get("rope_type") or "default"


def _rope_dims(facts: ModelFacts, rope: dict) -> int:
    """The head dimensions rope turns (llama.cpp's n_rot): all of them but for partial rotary."""
    return int(facts.head_dim * rope.get("partial_rotary_factor", 1.0))


# Rope whose frequencies differ each from base^(-2i/n_rot), written as tensors of per-frequency
# divisors: Llama 3's one table (rope_freqs), LongRoPE's two (llama.cpp takes the long one where
# the app's context exceeds the model's original length, the short one otherwise, as transformers
# does by the sequence's length).
ROPE_TABLES = {"llama3": "rope_freqs", "longrope": "rope_factors_long and rope_factors_short"}


def _rope_refusal(arch: Arch, facts: ModelFacts) -> str | None:
    """Rope llama.cpp cannot compute from what the file can say. It computes base^(-2i/n_rot) from
    the file's base and dimension count; a linear scaling divides every frequency by the file's
    factor (global layers only: its sliding layers keep their own); Llama 3's rope and LongRoPE
    divide each by its own, from tensors only some graphs read; YaRN's blend of scaled and unscaled
    frequencies it computes from the rope scaling keys, at its default bounds. Dynamic NTK rope
    only changes past the model's positions, where no export reaches: it is written as the plain
    rope (llama.cpp scales none past them)."""
    for kind, rope in _ropes(facts).items():
        where, rope_type = f" on {kind} layers" if kind else "", _rope_type(rope)
        if rope_type in ("default", "dynamic") or (rope_type == "linear" and kind in (None, "full_attention")):
            continue  # dynamic: the plain rope within the model's positions (decoder.hold_rope_static)
        if rope_type in ROPE_TABLES and kind is None:
            if rope_type not in arch.rope_tables:
                return (f"llama.cpp's {arch.name} graph reads no per-frequency rope factors ({ROPE_TABLES[rope_type]}), "
                        f"which {rope_type} rope needs")
            continue
        if rope_type == "yarn" and kind is None:
            if rope.get("truncate") is False:
                return "yarn rope with truncate false: llama.cpp rounds the blend's bounds to whole dimensions"
            if (rope.get("beta_fast") or YARN_BETAS[0], rope.get("beta_slow") or YARN_BETAS[1]) != YARN_BETAS:
                return (f"yarn rope with beta_fast {rope.get('beta_fast')} and beta_slow {rope.get('beta_slow')}: "
                        f"llama-cpp-python (and so the smoke) overrides the file's with {YARN_BETAS[0]:g} and {YARN_BETAS[1]:g}")
            continue
        return (f"rope type {rope_type!r}{where} is not written to GGUF yet (default, dynamic, linear, llama3, longrope "
                f"and yarn; where each layer type has its own rope, default or dynamic, and linear on global layers)")
    return None


YARN_BETAS = (32, 1)  # YaRN's blend bounds (rotations), transformers' and llama.cpp's defaults


def _yarn_keys(rope: dict, facts: ModelFacts, attention_scaling: float) -> tuple[float, int, float]:
    """YaRN as llama.cpp computes it from the file: the factor (its frequency scale's inverse), the
    original length (which sets the blend's bounds), and the attention factor key: llama.cpp
    scales cos/sin by 1 + 0.1 ln(factor) itself, times the key; transformers by its own
    attention_scaling (mscale and mscale_all_dim folded in)."""
    original = int(rope.get("original_max_position_embeddings") or facts.max_positions)
    factor = float(rope.get("factor") or facts.max_positions / original)
    return factor, original, attention_scaling / (1.0 + 0.1 * math.log(factor) if factor > 1 else 1.0)


LLAMA_CPP_CONTEXT_STEP = 256  # llama_context rounds n_ctx up to a multiple of it (GGML_PAD)


def length_refusal(loaded, max_seq_len: int) -> str | None:
    """LongRoPE past its original length: llama.cpp takes the long factors for every position once
    its context (rounded up) passes it, transformers the short ones up to it, so the smoke could
    not check the file at this cache length."""
    original, step = longrope_original_length(loaded.facts), LLAMA_CPP_CONTEXT_STEP
    if not original or -(-max_seq_len // step) * step <= original:
        return None
    return (f"longrope with --max-seq-len {max_seq_len} over the model's original {original} positions (llama.cpp "
            f"rounds a context up to a multiple of {step}): llama.cpp then turns every position by the long factors, "
            f"where the model turns the first {original} by the short ones, so the file cannot be checked against the "
            f"model at this length; give --max-seq-len {original // step * step} or less (an app may still run it at a "
            f"longer context)")


def _rope_frequency_factors(module: torch.nn.Module, facts: ModelFacts) -> np.ndarray:
    """What llama.cpp must divide each of its rope frequencies (base^(-2i/n_rot)) by to compute the
    model's own: the model's rotary frequencies, as transformers computed them, into llama.cpp's."""
    [rope] = _ropes(facts).values()
    dims = _rope_dims(facts, rope)
    own = float(rope["rope_theta"]) ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)
    return (own / _rotary(module).inv_freq.double().numpy()).astype(np.float32)


def _rotary(module: torch.nn.Module) -> torch.nn.Module:
    """The model's one rotary embedding (transformers': inv_freq and attention_scaling)."""
    [rotary] = {id(m.inv_freq): m for m in module.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)}.values()
    return rotary


def _rope_tensors(module: torch.nn.Module, facts: ModelFacts) -> list[tuple[str, np.ndarray]]:
    """The rope tables a scaled rope needs, by gguf tensor name (none for the other types)."""
    import gguf

    ropes = list(_ropes(facts).values())
    kinds = [_rope_type(rope) for rope in ropes]
    if kinds == ["llama3"]:
        tables = {gguf.MODEL_TENSOR.ROPE_FREQS: _rope_frequency_factors(module, facts)}
    elif kinds == ["longrope"]:
        tables = {gguf.MODEL_TENSOR.ROPE_FACTORS_LONG: np.asarray(ropes[0]["long_factor"], np.float32),
                  gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT: np.asarray(ropes[0]["short_factor"], np.float32)}
    else:
        tables = {}
    return [(f"{gguf.TENSOR_NAMES[tensor]}.weight", values) for tensor, values in tables.items()]


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
    arch, config = ARCHES[facts.family], loaded.module.config.get_text_config()
    if reason := _rope_refusal(arch, facts):
        return reason
    window = facts.sliding_window
    if window is not None and window < facts.max_positions and any(facts.sliding_layers()) and not arch.sliding_window:
        return (f"llama.cpp's {arch.name} graph has no sliding window, and this model's layers attend only to the "
                f"last {window} of its {facts.max_positions} positions")
    for name, (what, _) in SOFT_CAPS.items():
        value = getattr(config, name, None)
        if value and name not in arch.soft_caps:
            return f"llama.cpp's {arch.name} graph has no soft-capping of {what} ({name} {value})"
        if not value and arch.soft_caps.get(name):
            return f"llama.cpp's {arch.name} graph always soft-caps {what}; this model's {name} is {value}"
    if arch.query_scalar and config.query_pre_attn_scalar != (scalar := arch.query_scalar(facts)):
        return (f"llama.cpp's {arch.name} graph scales queries by 1/sqrt({scalar:g}) and reads no query_pre_attn_scalar; "
                f"this model's is {config.query_pre_attn_scalar}")
    if not (facts.tied_embeddings or arch.reads_output):
        return f"llama.cpp's {arch.name} graph reads the LM head from the token embedding; this model's head is untied"
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


def _relayout(work: _Work, name: str, values: np.ndarray, *, back: bool = False) -> np.ndarray:
    """Parameter `name`'s values in the file's layout, or `back` in Hugging Face's (the steps undone in reverse)."""
    for relayout in reversed(work.arch.relayouts) if back else work.arch.relayouts:
        if name.endswith(relayout.suffixes):
            values = (relayout.back if back else relayout.to_file)(values, name, work.captured.loaded.facts)
    return values


def read_architecture(work: _Work) -> None:
    loaded = work.captured.loaded
    reason = (_shape_refusal(loaded, work.quant) or _type_refusal(work.quant, work.options)
              or length_refusal(loaded, work.captured.llm_metadata["get_max_seq_len"]))
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
        data = _relayout(work, name, weight)
        if kind == "F32":
            work.stored[name] = torch.from_numpy(weight)  # read only: record_reference copies it into its own model
        else:
            if data.shape[-1] % BLOCK:
                raise InputError(f"gguf: {name} rows of {data.shape[-1]} do not split into blocks of {BLOCK}")
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            data = gguf.quants.quantize(data, qtype)
            work.stored[name] = torch.from_numpy(_relayout(work, name, gguf.quants.dequantize(data, qtype).astype(np.float32), back=True))
        work.tensors.append((target, np.ascontiguousarray(data), kind))
        work.hf_names[target] = name
    work.tensors += [(name, values, "F32") for name, values in _rope_tensors(hf, facts)]  # no parameters of the model


def record_reference(work: _Work) -> None:
    """The captured model holding the stored weights: a copy whose parameters are the stored
    tensors themselves (tied weights stay one), not a float copy of the model's own written over
    (4.9 GB more at Llama-3.2-1B's shape). Nothing writes them; its float norms share the model's."""
    params = dict(work.captured.module.model.named_parameters(remove_duplicate=False))
    memo = {id(params[name]): torch.nn.Parameter(weight.reshape(params[name].shape), requires_grad=False)
            for name, weight in work.stored.items()}
    work.reference = quantized_reference(copy.deepcopy(work.captured.module, memo), work.captured)


def write_file(work: _Work) -> None:
    import gguf

    loaded, facts, arch = work.captured.loaded, work.captured.loaded.facts, work.arch
    config = loaded.module.config.get_text_config()
    kinds = {kind for _, _, kind in work.tensors}
    work.path = work.folder / "model.gguf"
    writer = gguf.GGUFWriter(work.path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.name)])
    if name := _general_name(loaded.name, work.vocab):
        writer.add_name(name)
    writer.add_string("general.source.edgepack", f"edgepack {__version__} from {Path(loaded.source).name}")
    writer.add_context_length(facts.max_positions)
    writer.add_embedding_length(facts.hidden_size)
    writer.add_block_count(facts.n_layers)
    writer.add_feed_forward_length(arch.ffn_length(config))
    writer.add_head_count(facts.n_heads)
    writer.add_head_count_kv(facts.n_kv_heads)
    writer.add_key_length(facts.head_dim)
    writer.add_value_length(facts.head_dim)
    ropes = _ropes(facts)
    if facts.rope:  # rotary families (GPT-2 learns its positions)
        rope = ropes.get("full_attention", ropes.get(None))
        writer.add_rope_dimension_count(_rope_dims(facts, rope))
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        if _rope_type(rope) == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        if _rope_type(rope) == "yarn":
            factor, original, attention = _yarn_keys(rope, facts, _rotary(work.captured.module).attention_scaling)
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(factor)
            writer.add_rope_scaling_orig_ctx_len(original)
            writer.add_rope_scaling_attn_factors(attention)
        if _rope_type(rope) == "longrope":  # the length that picks the table, and cos/sin's scale
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
            writer.add_rope_scaling_attn_factors(float(_rotary(work.captured.module).attention_scaling))
    if arch.layer_norm:
        writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
    else:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if arch.sliding_window:
        writer.add_sliding_window_pattern(facts.sliding_layers())
        # no window: one spanning the context, so sliding layers keep their own rope base
        writer.add_sliding_window(facts.sliding_window or facts.max_positions)
        if "sliding_attention" in ropes:
            writer.add_rope_freq_base_swa(float(ropes["sliding_attention"]["rope_theta"]))
    for name in arch.soft_caps:
        if value := getattr(config, name, None):
            getattr(writer, SOFT_CAPS[name][1])(float(value))
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


def _general_name(name: str, vocab: GgufVocab) -> str | None:
    """general.name, unless llama.cpp would take it for Phi-3's: it gives a model whose name holds
    "phi3" or "phi-3" Phi-3's special-token stripping, and fails to load one whose vocabulary lacks
    Phi-3's special tokens (it reads general.name for nothing else)."""
    phi3 = any(word in name.lower() for word in ("phi3", "phi-3"))
    return None if phi3 and not {"</s>", "<unk>", "<s>", "<|endoftext|>"} <= set(vocab.tokens) else name


def _file_type(kinds: set[str]) -> int:
    """general.file_type: what most of the file is (llama.cpp prints it; nothing reads it)."""
    import gguf

    for kind in ("Q4_1", "Q4_0", "Q8_0"):
        if kind in kinds:
            return getattr(gguf.LlamaFileType, f"MOSTLY_{kind}")
    return gguf.LlamaFileType.ALL_F32


def quantize_with_llama_cpp(work: _Work) -> None:
    """llama.cpp's quantizer makes its mix from the F32 file; what it stored is read back (each
    tensor dequantized by gguf, in Hugging Face's layout again) for the reference."""
    import gguf

    mixed = work.folder / f"model-{work.options.type}.gguf"
    gguf_runtime.quantize(work.path, mixed, LLAMA_CPP_MIXES[work.options.type])
    work.path, work.tensors, work.stored = mixed, [], {}
    for t in gguf.GGUFReader(mixed).tensors:
        work.tensors.append((t.name, t.data, t.tensor_type.name))
        if (name := work.hf_names.get(t.name)) is None:  # rope_freqs: not a parameter of the model
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        values = _relayout(work, name, values.reshape([int(d) for d in reversed(t.shape)]), back=True)
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

# What the file's 4-bit layers store (the spec's "int4 g32" names no grid).
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
