"""MNN lowering: the captured model, its weights put on MNN's grid, exported as an fp32 ONNX graph
(exporters/onnx_capture.py's convention) and converted by MNN's own converter, which stores the
linear layers' weights in 4-bit blocks (asymmetric: each block its own min..max, fp16 scale and
minimum) or 8 bits per channel (symmetric).

The converter quantizes only matrix products with constant weights. An embedding table would stay
fp32 (for a 50k-token vocabulary, more than the rest of a small LM), so edgepack stores it on the
same grid itself: 4-bit codes two to a byte with fp16 scales and minimums per block, kept as their
bytes (int8 codes and one scale per row at 8 bits), looked up and unpacked by the graph for the
tokens of each call.

The weights are rounded onto that grid before export, so the converter's own rounding gives them
back unchanged: the reference is the captured model holding exactly those weights."""

from __future__ import annotations

import copy
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgepack import __version__
from edgepack.errors import InputError
from edgepack.exporters.capture import quantized_reference
from edgepack.exporters.lowering import Lowered, Lowering, Step, run_steps
from edgepack.exporters.mnn import BACKEND
from edgepack.exporters.mnn import runtime as mnn_runtime
from edgepack.exporters.mnn.options import Options
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
    row_slices,
    too_large_for_memory,
    too_large_for_weights_folder,
)
from edgepack.quant import QuantSpec, WeightQuant
from edgepack.rss import machine_memory_bytes
from edgepack.stages import CapturedModel, KvCache, QuantRecord, RuntimeRecord

MODEL_FILE = BACKEND.artifact
CONFIG_FILE = "mnn/config.json"
# Past about 2 GB MNN's converter writes the weights beside the model, where MNN's loader reads them.
WEIGHTS_FILE = f"{MODEL_FILE}.weight"
# The export's peak memory per byte of the model's float32 weights: 2.37x on a Llama-3.2-1B-shaped
# model (bench.scale, 2026-12-05, in the convert step; the converter, a child, peaked near 0.8 GB),
# rounded up; and its working folder's size (the exported weights and the .mnn, 1.23x measured).
EXPORT_MEMORY_PER_WEIGHT_BYTE = 2.5
WEIGHTS_FOLDER_PER_WEIGHT_BYTE = 1.5
OPSET = 18  # the lowest torch.onnx's dynamo exporter writes; MNN's ONNX front end reads it
BIZ_CODE = "edgepack"  # the model's bizCode (Module::getInfo), which says who made it
INT8 = Rounding(-127, 127, 127.0)  # MNN's symmetric 8-bit weights: scale = max|w| / 127, per channel


def refusal(loaded, quant: QuantSpec) -> str | None:
    """MNN's converter quantizes blocks of a multiple of 16 weights; other group sizes it would
    silently store per channel. A model needing more memory, or more free disk for the working
    folder, than this machine has is refused with the numbers."""
    if quant.scheme == "int4" and quant.linear.group_size % 16:
        return f"MNN's converter stores 4-bit blocks of 16, 32, 64 ... weights, not {quant.linear.group_size}"
    return (too_large_for_memory(loaded.module, EXPORT_MEMORY_PER_WEIGHT_BYTE, "the MNN export", machine_memory_bytes())
            or too_large_for_weights_folder(loaded.module, WEIGHTS_FOLDER_PER_WEIGHT_BYTE, "the MNN export"))


@dataclass
class _Work(Lowering):
    layers: dict[str, WeightQuant] = field(default_factory=dict)
    linear: WeightQuant | None = None  # the converter's flags: the linear layers' most common storage
    # layer path -> the graph outputs the converter may name its layer after: the MatMul's, and
    # with a bias the Add's it fuses
    linear_outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    module: nn.Module | None = None  # the captured module holding the weights the .mnn stores
    signature: OnnxSignature | None = None
    onnx_model: object = None  # onnx.ModelProto, its float weights in files under `folder`
    folder: Path | None = None  # the converter's working folder: the graph, its weights, the .mnn
    data: bytes = b""
    weights: bytes | None = None  # the converter's weights file, for a large model
    converter: dict = field(default_factory=dict)


def check_scheme(work: _Work) -> None:
    """What MNN stores: 4-bit blocks of a multiple of 16 (asymmetric) or 8 bits per channel
    (symmetric). The converter's flags set the linear layers' most common storage; the others
    (a precision plan's int8 layers) are named to it one by one (convert)."""
    work.layers = work.quant.layers(work.captured.module)
    for wq in set(work.layers.values()):
        if wq.bits == 4 and (wq.group_size is None or wq.group_size % 16):
            raise InputError(f"MNN stores 4-bit weights in blocks of a multiple of 16 ({wq.describe()})",
                             hint="use --group-size 32 (the default)")
        if wq.bits == 8 and wq.group_size is not None:
            raise InputError(f"MNN stores 8-bit weights per channel ({wq.describe()})", hint="use --quant int8")
    modules = dict(work.captured.module.named_modules())
    linear = Counter(wq for name, wq in work.layers.items() if isinstance(modules[name], nn.Linear))
    work.linear = linear.most_common(1)[0][0] if linear else None


def grid_image(weight: torch.Tensor, wq: WeightQuant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A [rows, cols] weight on MNN's grid: the codes [rows, cols] (0..15 at 4 bits, -127..127 at
    8), and per block the scale and the minimum [rows, blocks] (float32 holding fp16 values at 4
    bits; at 8 bits one fp32 scale per row and no minimum). w = scale·q + minimum."""
    rows, cols = weight.shape
    if wq.bits == 4:
        # fp16 weights, scales and minimums: the converter (--weightQuantScaleBit 16) recomputes
        # each block's min..max from these values and stores exactly this grid again.
        q, scale, minimum = by_row_slices(_fp16_min_max, weight.detach(), wq.group_size)
        return q.reshape(rows, cols), scale.reshape(rows, -1), minimum.reshape(rows, -1)
    q, scale = quantize_groups(weight.detach().float(), wq, INT8)
    return q.reshape(rows, cols), scale.reshape(rows, -1), None


def _fp16_min_max(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, scale, minimum = quantize_min_max(weight.to(torch.float16), 4, group_size, scale_dtype=torch.float16)
    return q.to(torch.uint8), scale, minimum  # codes 0..15: a byte each, not four


def _image(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
    w = q.unflatten(-1, (scale.shape[-1], -1)) * scale.unsqueeze(-1)
    if minimum is not None:
        w = w + minimum.unsqueeze(-1)
    return w.flatten(-2)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """fp16 values as their two bytes each (low byte first), uint8 [..., 2 * n]."""
    return values.to(torch.float16).contiguous().view(torch.uint8)


def _fp16_from_bytes(pairs: torch.Tensor, powers: torch.Tensor) -> torch.Tensor:
    """float32 from [..., 2 * n] fp16 bytes as floats (low byte first), exactly, in ops MNN runs:
    MNN's ONNX front end widens an fp16 table to fp32, which would store it at twice its bytes
    (3.5 MB more on SmolLM2-135M's 49152-row embedding), and its graphs have no bitcast. Finite
    values only (scales and minimums are). `powers` is FP16_POWERS."""
    low, high = pairs.unflatten(-1, (-1, 2)).unbind(-1)
    sign, quarter = torch.floor(high / 128), torch.floor(high / 4)  # the high byte: sign, 5 exponent bits, 2 mantissa bits
    exponent = quarter - 32 * sign
    mantissa = (high - 4 * quarter) * 256 + low
    # 2^(e-15), and 2^-14 for the subnormals (e = 0), whose implicit leading bit is 0
    power = torch.index_select(powers, 0, exponent.reshape(-1).long()).reshape(exponent.shape)
    return (1 - 2 * sign) * power * (torch.clamp(exponent, max=1) + mantissa / 1024)


FP16_POWERS = torch.tensor([2.0 ** -14] + [2.0 ** (e - 15) for e in range(1, 32)])


def _stored_lookup(layer: nn.Embedding, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> None:
    """The embedding as the graph computes it: the rows of the stored codes, scales and minimums
    for the call's tokens, unpacked to float. 4-bit codes are two to a byte, low nibble first; the
    fp16 scales and minimums are stored as their bytes, each block's scale then its minimum."""
    four = minimum is not None
    layer.register_buffer("stored_codes", (q[:, 0::2] + 16 * q[:, 1::2]).to(torch.uint8) if four else q.to(torch.int8))
    if four:
        layer.register_buffer("stored_halves", _fp16_bytes(torch.stack([scale, minimum], dim=-1).flatten(-2)))
        layer.register_buffer("fp16_powers", FP16_POWERS.clone())
    else:
        layer.register_buffer("stored_scales", scale)
    embed_scale = getattr(layer, "embed_scale", None)  # Gemma's scaled embedding multiplies its rows

    def rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # index_select traces to ONNX Gather of whole rows (plain indexing gives GatherND)
        return torch.index_select(table, 0, ids.reshape(-1)).float().unflatten(0, ids.shape)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        codes = rows(layer.stored_codes, ids)
        if four:
            high = torch.floor(codes / 16)
            codes = torch.stack([codes - 16 * high, high], dim=-1).flatten(-2)
            scale, minimum = _fp16_from_bytes(rows(layer.stored_halves, ids), layer.fp16_powers).unflatten(-1, (-1, 2)).unbind(-1)
            w = _image(codes, scale, minimum)
        else:
            w = _image(codes, rows(layer.stored_scales, ids), None)
        return w * embed_scale.to(w.dtype) if embed_scale is not None else w

    layer.forward = forward


def round_weights(work: _Work) -> None:
    """A copy of the captured module holding the weights the .mnn stores (tied ones rounded once),
    its embeddings as stored lookups; its answers are the reference."""
    module = copy.deepcopy(work.captured.module)
    modules = dict(module.named_modules())
    done: set[int] = set()
    with torch.no_grad():
        for name, wq in work.layers.items():
            layer = modules[name]
            if id(layer.weight) in done and not isinstance(layer, nn.Embedding):
                continue  # a tied LM head: its table is already on the grid
            q, scale, minimum = grid_image(layer.weight, wq)
            if id(layer.weight) not in done:
                done.add(id(layer.weight))
                for rows in row_slices(*q.shape):  # float temporaries of one slice of rows at a time
                    layer.weight[rows].copy_(_image(q[rows].float(), scale[rows], None if minimum is None else minimum[rows]))
            if isinstance(layer, nn.Embedding):
                _stored_lookup(layer, q, scale, minimum)
    work.module = module
    work.reference = quantized_reference(module, work.captured)


def export(work: _Work) -> None:
    """The rounded model as an fp32 ONNX graph: for decoder LMs the model inside the reference's
    wrapper, under the KV-cache convention."""
    module, task = work.module, work.captured.loaded.task
    transformers_model = module.model if task in ("causal-lm", "encoder") else module  # inside the wrapper
    if task == "encoder":
        # torch.onnx writes SDPA with a padding mask using IsNaN, which MNN's converter lacks;
        # eager attention is the same product (this copy only: the reference ran before)
        transformers_model.config._attn_implementation = "eager"
    work.signature = onnx_signature(work.captured, transformers_model if task == "causal-lm" else module)
    work.onnx_model = export_onnx(work.signature, transformers_model, OPSET, weights_dir=work.folder)
    nodes = weight_nodes(work.onnx_model, "MatMul", class_names(work.signature.module, nn.Linear))
    # The graph's files hold the rounded weights now: the rounded copy goes (5 GB for a 1B model).
    work.module, work.signature = None, replace(work.signature, module=None)
    graph = work.onnx_model.graph
    outputs = {node.name: node.output[0] for node in graph.node}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def names(output: str) -> tuple[str, ...]:
        users = consumers.get(output, [])
        return (output, users[0].output[0]) if len(users) == 1 and users[0].op_type == "Add" else (output,)

    work.linear_outputs = {path: names(outputs[name]) for name, path in nodes.items()}


def converter_flags(linear: WeightQuant | None) -> list[str]:
    if linear is None:
        return []
    if linear.bits == 4:
        return ["--weightQuantBits", "4", "--weightQuantAsymmetric=1", "--weightQuantBlock", str(linear.group_size),
                "--weightQuantScaleBit", "16"]
    return ["--weightQuantBits", "8", "--weightQuantAsymmetric=0"]


def save_for_converter(model, path: Path) -> None:
    """The graph with its fp32 weights in files beside it (a graph over 2 GB cannot be one file;
    those export_onnx wrote in the same folder stay where they are). Other tables stay inside: the
    converter reads external uint8 and fp16 tensors wrongly (the model it writes then fails to load)."""
    import onnx
    from onnx.external_data_helper import (
        convert_model_to_external_data,
        load_external_data_for_tensor,
        uses_external_data,
        write_external_data_tensors,
    )

    for tensor in model.graph.initializer:  # as if the graph had come whole: only large float tensors stay out
        length = int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
        if uses_external_data(tensor) and (tensor.data_type != onnx.TensorProto.FLOAT or length < 1024):
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=f"{path.name}.data", size_threshold=1024)
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT and tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    write_external_data_tensors(model, str(path.parent))
    onnx.save_model(model, path)


def _set_apart(work: _Work) -> dict[str, WeightQuant]:
    """The linear layers in the graph stored otherwise than the converter's flags say (a precision
    plan's int8 layers among int4 ones)."""
    return {name: wq for name, wq in work.layers.items() if name in work.linear_outputs and wq != work.linear}


def _layer_settings(listing: dict, apart: dict[str, WeightQuant], outputs: dict[str, tuple[str, ...]]) -> dict:
    """The converter's own listing of the layers it quantizes (its compression-parameters JSON,
    one entry per matrix product it turned into a convolution, named after the product's output),
    with the layers set apart given their own storage."""
    by_output = {output: name for name in apart for output in outputs[name]}
    found = set()
    for layer in (layer for algo in listing["algo"] for layer in algo["quantParams"]["layer"]):
        name = by_output.get(layer["opName"].rsplit("__", 1)[0])
        if name is not None:
            wq = apart[name]
            layer["weight"][0].update(bits=wq.bits, asymmetric=wq.bits == 4, blockSize=wq.group_size or 0)
            found.add(name)
    missing = sorted(set(apart) - found)[:3]
    if missing:
        raise RuntimeError(f"MNN's converter lists no layer for {missing} (graph outputs {[outputs[n] for n in missing]})")
    return listing


def convert(work: _Work) -> None:
    """MNN's converter, in a child process (its C++ logs go to the stage's log, and a crash in it
    cannot take edgepack down). When some linear layers are stored otherwise than most (a precision
    plan's int8 layers), a first run lists the layers and a second stores each as set there."""
    flags = converter_flags(work.linear)
    apart = _set_apart(work)
    # The exporter's value_info is only a hint, and MNN's converter misreads it (the model it
    # writes then fails to load: "Alloc memory for const tensor error"); it infers its own.
    del work.onnx_model.graph.value_info[:]
    tmp = work.folder
    source, target = tmp / "model.onnx", tmp / "model.mnn"
    save_for_converter(work.onnx_model, source)
    work.onnx_model = None  # its weights can be large; the file has them now
    run = [*flags, "--bizCode", BIZ_CODE]
    if apart:
        listing, settings = tmp / "layers.json", tmp / "settings.json"
        mnn_runtime.convert(source, target, [*run, "--compressionParamsFile", str(listing)])
        settings.write_text(json.dumps(_layer_settings(json.loads(listing.read_text()), apart, work.linear_outputs)))
        run += ["--compressionParamsFile", str(settings)]
    mnn_runtime.convert(source, target, run)
    mnn_runtime.stable_model_id(target)
    work.data = target.read_bytes()
    beside = target.with_name(f"{target.name}.weight")
    work.weights = beside.read_bytes() if beside.exists() else None
    work.converter = {"flags": " ".join(flags) or "(weights fp32)", "layers_set_apart": len(apart)}


def finish(work: _Work) -> None:
    """config.json beside the model: what an app needs to drive it (I/O names, the KV cache's
    layout, stop tokens, context length, tokenizer files), and the tokenizer itself."""
    captured = work.captured
    loaded, meta = captured.loaded, captured.llm_metadata
    [method] = work.signature.methods
    config = {
        "format": "edgepack-mnn/1",
        "model": MODEL_FILE.split("/")[-1],
        "name": loaded.name,
        "task": loaded.task,
        "edgepack_version": __version__,
        "inputs": [t.name for t in method.inputs],
        "outputs": [t.name for t in method.outputs],
        "quantization": work.quant.describe(),
    }
    tok = loaded.tokenizer
    if loaded.task == "causal-lm":
        facts = loaded.facts
        config["decoder"] = {
            "context_length": meta["get_max_seq_len"], "num_hidden_layers": facts.n_layers,
            "num_key_value_heads": facts.n_kv_heads, "head_size": facts.head_dim, "vocab_size": facts.vocab_size,
            "past": list(PAST), "present": list(PRESENT), "kv_layout": "[1, kv_heads, length, head_dim]",
            "cache_growth": "present = past followed by the new tokens; the first call passes past length 0"}
    if tok is not None:
        config["tokenizer"] = tok.stop_facts()
    work.files = {MODEL_FILE: work.data, **({WEIGHTS_FILE: work.weights} if work.weights else {}), CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
                  **(tok.file_bytes("mnn/") if tok else {})}


STEPS: tuple[Step, ...] = (
    Step("check", check_scheme),
    Step("round", round_weights),
    Step("export", export),
    Step("convert", convert),
    Step("finish", finish),
)

GRID = ("4-bit linear layers: MNN's asymmetric blocks (each its own min..max, fp16 scale and minimum), stored by "
        "its converter; embeddings: the same grid, stored by edgepack (codes two to a byte) and unpacked by the graph")


def lower(captured: CapturedModel, quant: QuantSpec, options: Options,
          on_step: Callable[[str], None] | None = None) -> Lowered:
    with tempfile.TemporaryDirectory(prefix="edgepack-mnn-") as folder:
        work = run_steps(BACKEND.name, STEPS, _Work(captured, quant, options, folder=Path(folder)), on_step)
    return Lowered(
        files=dict(work.files),
        methods=work.signature.methods,
        quantization=QuantRecord(quant.describe(), f"MNN converter {version('mnn')}",
                                 {"grid": GRID} if quant.scheme == "int4" else {}),
        ideal_bytes=quant.ideal_bytes(captured.module, offsets=lambda wq: wq.bits == 4),
        runtime=RuntimeRecord("MNN", mnn_runtime.runtime_version(), {
            "converter": f"MNN converter {version('mnn')} ({work.converter['flags']}; "
                         f"{work.converter['layers_set_apart']} layers stored otherwise by --compressionParamsFile) "
                         f"from torch.onnx (dynamo) {torch.__version__}, opset {OPSET}",
            "api": "Express Module (MNN::Express::Module::load), CPU backend",
            "memory_mode": mnn_runtime.MEMORY_MODE,
            "dynamic_quant_option": mnn_runtime.DYNAMIC_QUANT_OPTION,
            "config": CONFIG_FILE,
        }),
        reference=work.reference,
        kv_cache=KvCache("float32", "growing"),
    )
