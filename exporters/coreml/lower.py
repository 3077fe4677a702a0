"""CoreML lowering: coremltools converts the captured ExportedProgram to an ML program (iOS 18 by
default), the decoder's KV-cache buffers become CoreML states, linear and embedding weights are
compressed after conversion (int4 per-block, int8 per-channel, or 4-bit palettes; chosen per
layer, so a mixed-precision plan's int8 layers sit beside int4 ones in one program), and the
.mlpackage carries the tokenizer facts as user-defined metadata. Its bytes are made reproducible
by exporters/coreml/package.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgepack import __version__
from edgepack.errors import BackendError, InputError
from edgepack.exporters.capture import quantized_reference
from edgepack.exporters.coreml import BACKEND
from edgepack.exporters.coreml.options import Options
from edgepack.exporters.coreml.package import package_files
from edgepack.exporters.decoder import longrope_original_length
from edgepack.exporters.lowering import Lowered, Lowering, Step, run_steps
from edgepack.exporters.weights import OffsetGrid, Rounding, weight_only_reference
from edgepack.quant import QuantSpec, WeightQuant
from edgepack.stages import CapturedModel, KvCache, MethodSpec, QuantRecord, RuntimeRecord, TensorSpec

ARTIFACT_DIR = BACKEND.artifact
# Channels that share one 16-entry palette (per_grouped_channel): coremltools' suggestion for LLMs.
PALETTE_GROUP_CHANNELS = 16
# CoreML has no int64 tensors: integer inputs are int32 in the program, and the host adapter casts.
_COREML_DTYPE = {"int64": "int32", "int32": "int32", "float32": "float32", "float16": "float16", "bool": "bool"}


@dataclass
class _Work(Lowering):
    compression: str  # "int4_offset", "int4", "int8", "palettize4" or "none"
    workdir: Path
    program: Any = None  # torch ExportedProgram
    state_names: tuple[str, ...] = ()
    converted: dict = field(default_factory=dict)  # the child's result.json

    @property
    def package(self) -> Path:
        return self.workdir / "model.mlpackage"


def _compression(quant: QuantSpec, options: Options) -> str:
    if quant.scheme == "none":
        if options.compression:
            raise InputError(f"--coreml-compression {options.compression} needs --quant int4",
                             hint="drop --coreml-compression or use --quant int4")
        return "none"
    if quant.scheme == "int8":
        if options.compression:
            raise InputError(f"--coreml-compression {options.compression} is a 4-bit scheme but --quant is int8",
                             hint="use --quant int4 with --coreml-compression")
        return "int8"
    chosen = options.compression or "int4"
    return "int4_offset" if chosen == "int4" and options.grid == "offset" else chosen


def _mutated_buffers(module: nn.Module) -> tuple[str, ...]:
    """The KV-cache buffers the forward pass writes (StaticCacheLM): they become CoreML states."""
    return tuple(name for name, _ in module.named_buffers() if "cache" in name.split(".")[-1])


def _check_target(captured: CapturedModel, compression: str, options: Options) -> None:
    """Refuse before any work when the model needs what the chosen iOS version lacks."""
    if options.ios_target >= 18:
        return
    stateful = bool(_mutated_buffers(captured.module))
    needs = []
    if stateful:
        needs.append("a stateful KV cache (CoreML states, ct.StateType)")
    if compression in ("int4", "int4_offset"):
        needs.append("int4 per-block weights (constexpr_blockwise_shift_scale)")
    if compression == "palettize4":
        needs.append("per-grouped-channel 4-bit palettes (constexpr_lut_to_dense)")
    if needs:
        raise InputError(f"--ios-target {options.ios_target}: this model needs {' and '.join(needs)}, "
                         "which CoreML supports from iOS 18 only",
                         hint="use --ios-target 18" + ("" if stateful else " (or --quant int8 for iOS 17)"))


def _rounding(bits: int) -> Rounding:
    """coremltools' linear_symmetric grid (optimize/_utils.py get_quant_range): signed values in
    [-(2^(b-1)-1), 2^(b-1)-1] and scale = 2·max|w| / (qmax - qmin) = max|w| / qmax."""
    return Rounding.symmetric(bits, narrow=True)


def offset_grid(precision: str) -> OffsetGrid:
    """The offset grid as the child stores it: the weight const is already in the compute
    precision, and scale and offset are too (constexpr_blockwise_shift_scale's output type)."""
    return OffsetGrid(torch.float16 if precision == "fp16" else torch.float32)


def record_reference(work: _Work) -> None:
    module = work.captured.module
    if work.compression in ("int4", "int8"):
        module = weight_only_reference(module, work.quant, _rounding)
    elif work.compression == "int4_offset":
        grid = offset_grid(work.options.precision)
        module = weight_only_reference(module, work.quant, lambda bits: grid if bits == 4 else _rounding(bits))
    work.reference = quantized_reference(module, work.captured)


def _unconvertible(program) -> list:
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    def name(target) -> str:
        return target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return [n for n in program.graph.nodes
            if n.op == "call_function" and _TORCH_OPS_REGISTRY.get_func(name(n.target)) is None]


def _drop_aliases(program) -> None:
    """aten.alias is an identity view (Phi-3's rotary code makes some) that coremltools has no
    converter and torch no decomposition for: its users read its input instead."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()


def _rms_pattern(rsqrt):
    """(x, dims, eps) when rsqrt computes rsqrt(mean(x², dims, keepdim) + eps), RMSNorm as every
    Hugging Face family writes it (pow(x, 2) or x·x; eps a number); None otherwise."""
    aten = torch.ops.aten
    add = rsqrt.args[0]
    if not (isinstance(add, torch.fx.Node) and add.op == "call_function"
            and add.target in (aten.add.Tensor, aten.add.Scalar) and len(add.args) == 2 and not add.kwargs):
        return None
    mean, eps = add.args if isinstance(add.args[0], torch.fx.Node) else add.args[::-1]
    if not (isinstance(mean, torch.fx.Node) and isinstance(eps, (int, float)) and mean.target == aten.mean.dim
            and len(mean.args) == 3 and mean.args[2] is True and not mean.kwargs):
        return None
    square, dims = mean.args[0], mean.args[1]
    if not (isinstance(square, torch.fx.Node) and square.op == "call_function"):
        return None
    if square.target == aten.pow.Tensor_Scalar and square.args[1] == 2:
        x = square.args[0]
    elif square.target == aten.mul.Tensor and square.args[0] is square.args[1]:
        x = square.args[0]
    else:
        return None
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    return (x, list(dims), float(eps)) if isinstance(val, torch.Tensor) and val.dtype == torch.float32 else None


def _fp16_safe_rms_norms(program) -> int:
    """Rewrite every RMSNorm's rsqrt(mean(x²) + eps) as rsqrt(mean((x/m)²) + eps/m²) / m with
    m = max(max|x|, 1) over the same axes: the same value, but no intermediate leaves fp16's range.

    The plain form squares the activations, and x² overflows fp16 (max 65504) once |x| > 256:
    Llama-family residual streams reach that (SmolLM2-135M: 620 on the first token from layer 3,
    over 256 on every token by the last layer), so the mean becomes inf, rsqrt 0 and the token's
    normalized hidden state 0 (all its logits 0 after the final norm). The Neural Engine and GPU
    hold fp16-typed tensors in fp16, so a device breaks as the evaluator does.
    After scaling every square is at most 1, the mean at least 1/N when m is the real maximum (so
    eps/m², which may underflow, does not matter), and for max|x| <= 1 (m = 1) it is the plain
    form. The scale cancels exactly, so any rounding of m costs nothing. (coremltools' own
    aten.rms_norm converter scales by max|x| too but adds eps unscaled, coremltools issue #2821;
    Hugging Face norms never reach it anyway: torch.export decomposes them into these ops.)
    Returns the number of norms rewritten."""
    from torch._guards import detect_fake_mode

    aten = torch.ops.aten
    graph = program.graph_module.graph
    rewritten = 0
    for rsqrt in [n for n in graph.nodes if n.op == "call_function" and n.target == aten.rsqrt.default]:
        found = _rms_pattern(rsqrt)
        if found is None:
            continue
        x, dims, eps = found
        fake_mode = detect_fake_mode([x.meta["val"]])

        def call(target, *args):
            node = graph.call_function(target, args)
            node.meta.update({k: v for k, v in rsqrt.meta.items() if k in ("stack_trace", "nn_module_stack")})
            with fake_mode:
                node.meta["val"] = target(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args))
            return node

        with graph.inserting_before(rsqrt):
            m = call(aten.clamp_min.default, call(aten.amax.default, call(aten.abs.default, x), dims, True), 1.0)
            mean = call(aten.mean.dim, call(aten.pow.Tensor_Scalar, call(aten.div.Tensor, x, m), 2), dims, True)
            total = call(aten.add.Tensor, mean, call(aten.mul.Tensor, call(aten.pow.Tensor_Scalar, m, -2), eps))
            scaled = call(aten.div.Tensor, call(aten.rsqrt.default, total), m)
        rsqrt.replace_all_uses_with(scaled)
        dead = [rsqrt]
        while dead:  # the old chain, as far as nothing else reads it
            node = dead.pop()
            if node.users or node.op != "call_function":
                continue
            inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
            graph.erase_node(node)
            dead.extend(inputs)
        rewritten += 1
    graph.lint()
    program.graph_module.recompile()
    return rewritten


def length_refusal(loaded, max_seq_len: int) -> str | None:
    """LongRoPE past its original length switches its frequencies by the sequence's length, a
    buffer update (transformers' rotary rewrites inv_freq) that coremltools cannot convert; within
    it the front end holds the rope static (decoder.hold_rope_static)."""
    original = longrope_original_length(loaded.facts)
    if not original or max_seq_len <= original:
        return None
    return (f"LongRoPE past the model's original {original} positions (--max-seq-len {max_seq_len}) switches its "
            f"frequencies by a buffer update coremltools cannot convert; give --max-seq-len {original} or less")


def export_program(work: _Work) -> None:
    """torch.export, then decompose only the ops coremltools' torch front end has no converter
    for (e.g. new_ones in BERT's mask code), where torch's core-ATen table knows a decomposition."""
    captured = work.captured
    length = captured.llm_metadata.get("get_max_seq_len")  # decoder LMs only
    if length and (reason := length_refusal(captured.loaded, length)):
        raise InputError(f"coreml: {reason}", hint="leave coreml out of --target")
    program = torch.export.export(captured.module, captured.example_inputs,
                                  dynamic_shapes=captured.dynamic_shapes, strict=False).run_decompositions({})
    _drop_aliases(program)
    if work.options.precision == "fp16":
        _fp16_safe_rms_norms(program)
    missing = {n.target for n in _unconvertible(program)}
    if missing:
        table = {op: fn for op, fn in torch.export.default_decompositions().items() if op in missing}
        program = program.run_decompositions(table)
    left = _unconvertible(program)
    if left:
        where = "; ".join(f"{n.target} at {(n.meta.get('stack_trace') or '?').strip().splitlines()[-1].strip()}"
                          for n in left[:5])
        raise BackendError("coreml", "export", f"coremltools has no converter for {len(left)} op(s): {where}",
                           hint="the model needs an op CoreML's torch front end lacks")
    work.program = program
    work.state_names = _mutated_buffers(captured.module)
    torch.export.save(work.program, work.workdir / "program.pt2")
    (work.workdir / "job.json").write_text(json.dumps(_job(work), indent=1))


def _job(work: _Work) -> dict:
    """What the child process (coreml_convert.py) needs, as JSON."""
    captured, module = work.captured, work.captured.module
    method = captured.methods[0]
    weights = _weight_storage(work)
    inputs = [{"name": spec.name, "dtype": _COREML_DTYPE[spec.dtype],
               "shape": [[*method.dynamic_dims[d], int(example.shape[i])] if isinstance(d, str) else d
                         for i, d in enumerate(spec.shape)]}
              for spec, example in zip(method.inputs, captured.example_inputs)]
    return {
        "inputs": inputs,
        "outputs": [{"name": o.name, "dtype": "float32" if o.dtype.startswith("float") else None} for o in method.outputs],
        "states": [{"name": n, "shape": list(getattr(module, n).shape)} for n in work.state_names],
        "ios_target": work.options.ios_target,
        "precision": work.options.precision,
        "compression": work.compression,
        "group_size": work.quant.linear.group_size if work.quant.linear else None,
        "palette_group_channels": PALETTE_GROUP_CHANNELS,
        "offset_dtype": str(offset_grid(work.options.precision).dtype).removeprefix("torch."),
        "weights": weights,
        "metadata": _metadata(work, weights),
    }


def _storage(wq: WeightQuant, work: _Work) -> str:
    """coreml_convert's name for how one layer's weight is stored: 4-bit layers as the export's
    compression says (int4 blocks or palettes), int8 ones per output channel."""
    if wq.bits == 8 and wq.group_size is None:
        return "int8"
    if wq.bits == 4 and wq.group_size == work.quant.linear.group_size:
        return work.compression
    raise InputError(f"CoreML stores int4 blocks of {work.quant.linear.group_size} or int8 per channel, not {wq.describe()}",
                     hint="use one --group-size for every int4 layer")


def _weight_storage(work: _Work) -> dict[str, str]:
    """How each quantized weight the program uses is stored, by its placeholder in the exported
    program (the name coremltools gives its const). A tied weight is stored as its first layer says,
    as weight_only_reference quantizes it."""
    if work.compression == "none":
        return {}
    module = work.captured.module
    by_weight: dict[int, str] = {}
    for name, layer in module.named_modules():
        wq = work.quant.for_layer(name, layer)
        if wq is not None:
            by_weight.setdefault(id(layer.weight), _storage(wq, work))
    params = dict(module.named_parameters(remove_duplicate=False))
    used = {n.name for n in work.program.graph.nodes if n.op == "placeholder" and n.users}
    return {placeholder: by_weight[id(params[fqn])]
            for placeholder, fqn in sorted(work.program.graph_signature.inputs_to_parameters.items())
            if placeholder in used and id(params[fqn]) in by_weight}


def _compression_label(compression: str, weights: dict[str, str]) -> str:
    """The compression in words: the export's, plus the weights a mixed-precision plan keeps int8."""
    int8 = sum(kind == "int8" for kind in weights.values()) if compression != "int8" else 0
    return f"{compression} + int8 per-channel ({int8} weights)" if int8 else compression


def _metadata(work: _Work, weights: dict[str, str]) -> dict:
    loaded, meta, tok = work.captured.loaded, work.captured.llm_metadata, work.captured.loaded.tokenizer
    user = {"edgepack.name": loaded.name, "edgepack.task": loaded.task,
            "edgepack.compression": _compression_label(work.compression, weights), "edgepack.precision": work.options.precision}
    if tok:
        user.update({
            "tokenizer.bos_id": "" if tok.bos_id is None else str(tok.bos_id),
            "tokenizer.eos_ids": ",".join(map(str, tok.eos_ids)),
            "tokenizer.pad_id": "" if tok.pad_id is None else str(tok.pad_id),
            "tokenizer.add_bos": str(tok.add_bos).lower(),
            "tokenizer.chat_template": "present (see the bundle's manifest.json tokenizer.chat_template)"
                                       if tok.chat_template else "none",
        })
    if meta:
        user["generation.max_seq_len"] = str(meta["get_max_seq_len"])
        user["generation.max_context_len"] = str(meta["get_max_context_len"])
    return {
        "author": "edgepack",
        "version": __version__,
        "short_description": f"{loaded.name} ({loaded.task}) exported by edgepack {__version__}",
        "user": user,
        "descriptions": IO_DESCRIPTIONS,
    }


IO_DESCRIPTIONS = {
    "tokens": "token ids [1, T]: the prompt (prefill) or the last generated token (decode)",
    "input_pos": "position of tokens[0] in the sequence: how many tokens the KV-cache states already hold",
    "logits": "next-token logits for the last input token [1, vocab]",
    "input_ids": "token ids [1, T]",
    "attention_mask": "1 for real tokens, 0 for padding [1, T]",
    "last_hidden_state": "encoder output [1, T, hidden]; mean-pool over the mask for a sentence embedding",
}


def convert_in_child(work: _Work) -> None:
    """convert, quantize, metadata and save, in a child with a fixed hash seed (see coreml_convert.py)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-m", "edgepack.exporters.coreml.convert", str(work.workdir)],
                          env=env, capture_output=True, text=True)
    result_path = work.workdir / "result.json"
    if not result_path.is_file():
        raise BackendError("coreml", "convert", f"the coremltools child process exited with {proc.returncode}: "
                                                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}")
    work.converted = json.loads(result_path.read_text())
    if "failed_step" in work.converted:
        child_traceback = RuntimeError(work.converted.get("traceback", "(no traceback)"))
        raise BackendError("coreml", work.converted["failed_step"], work.converted["error"],
                           hint="run with --verbose for the child's traceback") from child_traceback


def reference_from_package(work: _Work) -> None:
    """Palettes are k-means clusters of the converted weights, so the reference holds the weights
    the artifact actually stores: each compressed weight (palettes, and the int8 layers of a mixed
    plan) is expanded by coremltools back into its parameter."""
    from edgepack.exporters.coreml.convert import COMPRESSED_WEIGHT_OPS, weight_placeholder
    from edgepack.exporters.coreml.mil import load_program

    params = work.program.graph_signature.inputs_to_parameters  # placeholder name -> parameter FQN
    module = copy.deepcopy(work.captured.module)
    named = dict(module.named_parameters(remove_duplicate=False))
    for function in load_program(work.package).functions.values():
        for op in function.operations:
            if op.op_type not in COMPRESSED_WEIGHT_OPS:
                continue
            placeholder = weight_placeholder(op.outputs[0].name)
            if placeholder not in params:
                raise BackendError("coreml", "reference", f"cannot map compressed weight {op.outputs[0].name} to a parameter")
            value = np.asarray(op.materialized_val_inference(), dtype=np.float32)
            with torch.no_grad():
                named[params[placeholder]].copy_(torch.from_numpy(value))
    work.reference = quantized_reference(module, work.captured)


def package(work: _Work) -> None:
    work.files = {f"{ARTIFACT_DIR}/{rel}": data for rel, data in package_files(work.package).items()}


# Linear quantization has a closed-form grid, so its reference comes from the fp32 module first;
# palettes are k-means results, so their reference is read back from the converted package.
STEPS: dict[str, tuple[Step, ...]] = {
    "linear": (Step("reference", record_reference), Step("export", export_program),
               Step("convert", convert_in_child), Step("package", package)),
    "palette": (Step("export", export_program), Step("convert", convert_in_child),
                Step("reference", reference_from_package), Step("package", package)),
}


def _methods(work: _Work) -> tuple[MethodSpec, ...]:
    """The captured methods with the dtypes the program really takes (no int64 in CoreML)."""
    def retyped(t: TensorSpec, as_output: bool) -> TensorSpec:
        dtype = "float32" if as_output and t.dtype.startswith("float") else _COREML_DTYPE[t.dtype]
        return TensorSpec(t.name, dtype, t.shape)
    return tuple(MethodSpec(m.name, tuple(retyped(t, False) for t in m.inputs),
                            tuple(retyped(t, True) for t in m.outputs), m.dynamic_dims)
                 for m in work.captured.methods)


def ideal_bytes(quant: QuantSpec, module: nn.Module, precision: str, compression: str) -> int:
    """An ML program stores scales, palettes and every unquantized parameter in its compute
    precision (16 bits for fp16, 32 for fp32); a 4-bit palette is 16 entries per group of rows,
    an offset-grid block a scale and an offset (int8 layers of a mixed plan keep one scale per row
    beside them)."""
    float_bits = 16 if precision == "fp16" else 32

    def palettes(weight: torch.Tensor, wq: WeightQuant) -> float:
        rows = weight.shape[0]
        return (-(-rows // PALETTE_GROUP_CHANNELS) * 16 if wq.bits == 4 else rows) * float_bits

    return quant.ideal_bytes(module, float_bits=float_bits, scale_bits=float_bits,
                             side_bits=palettes if compression == "palettize4" else None,
                             offsets=(lambda wq: wq.bits == 4) if compression == "int4_offset" else None)


def lower(captured: CapturedModel, quant: QuantSpec, options: Options,
          on_step: Callable[[str], None] | None = None) -> Lowered:
    import coremltools as ct

    compression = _compression(quant, options)
    _check_target(captured, compression, options)
    steps = STEPS["palette" if compression == "palettize4" else "linear"]
    with tempfile.TemporaryDirectory(prefix="edgepack-coreml-") as tmp:
        work = run_steps(BACKEND.name, steps, _Work(captured, quant, options, compression, Path(tmp)), on_step)
    converted, module = work.converted, captured.module
    return Lowered(
        files=work.files,
        methods=_methods(work),
        quantization=QuantRecord(quant.describe(), f"coremltools {ct.__version__}", {
            "compression": compression,
            **({"grid": options.grid} if compression in ("int4", "int4_offset") else {}),
            "activations": options.precision, "compressed_weight_ops": converted["compressed_ops"],
            "stored_weights": dict(sorted(Counter(converted["stored_weights"].values()).items()))}),
        ideal_bytes=ideal_bytes(quant, captured.module, options.precision, compression),
        runtime=RuntimeRecord("coreml", ct.__version__, {
            "specification_version": converted["specification_version"],
            "deployment_target": f"iOS{options.ios_target}",
            "compute_precision": options.precision,
            # manifest method -> ML program function; states hold the KV cache between calls
            "functions": {m.name: "main" for m in captured.methods},
            "states": [{"name": n, "dtype": "float16", "shape": list(getattr(module, n).shape)} for n in work.state_names],
            "op_counts": converted["op_counts"],
            **({"tokenizer": "tokenizer/tokenizer.json and tokenizer_config.json (e.g. swift-transformers' "
                         "AutoTokenizer); this tokenizer is not checked by edgepack"}
               if captured.loaded.tokenizer else {}),
        }),
        reference=work.reference,
        kv_cache=KvCache("float16", "static"),
    )
