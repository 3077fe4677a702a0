"""ExecuTorch lowering: int4 weights on the offset grid (offset_grid.py, the default) or torchao's
8da4w, XNNPACK delegate, a .pte that follows the LLM runner's calling convention and carries its
metadata as constant methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Callable

import torch
from torch import nn

from edgepack.exporters.capture import quantized_reference
from edgepack.exporters.decoder import StaticCacheLM
from edgepack.exporters.executorch import BACKEND
from edgepack.exporters.executorch.llm_ops import use_llm_custom_ops
from edgepack.exporters.executorch.offset_grid import offset_embedding, offset_linear
from edgepack.exporters.executorch.options import Options
from edgepack.exporters.executorch.shared_input import share_inputs
from edgepack.exporters.executorch.symmetric_grid import SCALE_SEARCH, symmetric_blocks_
from edgepack.exporters.lowering import Lowered, Lowering, Step, run_steps
from edgepack.exporters.weights import copy_sharing_weights
from edgepack.quant import QuantSpec, WeightQuant
from edgepack.stages import CapturedModel, KvCache, QuantRecord, RuntimeRecord

# Operator namespaces left outside the delegate, and the kernel library that provides them.
# An app must link these (and the host runtime must import them) or the .pte fails to load (0x14).
KERNEL_LIBRARIES = {
    "quantized_decomposed": ("quantized", "executorch.kernels.quantized"),
    "llama": ("llm_custom_ops", "executorch.extension.llm.custom_ops.custom_ops"),
}


# The int8 layers' scales (one a row) are searched by torchao's half-quadratic least squares, as
# ExecuTorch's own export_llm searches its; the 4-bit blocks' are searched by symmetric_grid.py.
INT8_SCALE_SEARCH = "hqq_scale_only"


@dataclass
class _Work(Lowering):
    module: nn.Module | None = None
    attention: str | None = None  # decoder LMs: how attention and the KV cache are lowered
    metadata: dict = field(default_factory=dict)  # the LLM runner's constant methods
    program: Any = None
    edge: Any = None
    kernel_libraries: list[str] = field(default_factory=list)


def _torchao_config(wq: WeightQuant, dynamic_activations: bool, for_linear: bool):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    granularity = PerGroup(wq.group_size) if wq.group_size else PerAxis(0)
    mapping = MappingType.SYMMETRIC if wq.symmetric else MappingType.ASYMMETRIC
    dtype = getattr(torch, f"int{wq.bits}")
    if for_linear and dynamic_activations:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity,
                                                     weight_mapping_type=mapping,
                                                     intx_choose_qparams_algorithm=INT8_SCALE_SEARCH)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity, mapping_type=mapping,
                                intx_choose_qparams_algorithm=INT8_SCALE_SEARCH)


def take_llm_fast_path(work: _Work) -> None:
    """Work on a copy (the fp32 capture stays for other backends; the copy's weights are replaced,
    never written into, so it shares them); a decoder LM's cache and attention move to
    ExecuTorch's LLM kernels where the model allows it."""
    work.module = copy_sharing_weights(work.captured.module)
    work.metadata = dict(work.captured.llm_metadata)
    if isinstance(work.module, StaticCacheLM):
        work.module, reason = use_llm_custom_ops(work.module)
        work.attention = f"portable ops ({reason})" if reason else "llama::custom_sdpa + llama::update_cache"
        work.metadata["use_sdpa_with_kv_cache"] = reason is None


def quantize_weights(work: _Work) -> None:
    quantize_module(work.module, work.quant, work.options.grid, work.captured.example_inputs)


def on_offset_grid(grid: str, wq: WeightQuant) -> bool:
    return grid == "offset" and wq.bits == 4 and wq.group_size is not None


def quantize_module(module: nn.Module, spec: QuantSpec, grid: str = "symmetric",
                    example_inputs: tuple | None = None) -> nn.Module:
    """The module's linear and embedding weights replaced by torchao tensors, as the .pte stores
    them (eager, the result is the quantized model the .pte must reproduce). 4-bit layers are built
    here from the float weights, on the offset grid (offset_grid.py) or the symmetric one
    (symmetric_grid.py), one layer at a time, each float weight let go once its replacement is
    built (the transient memory is one layer's, not the model's; a tied table's users are replaced,
    never written into, so each reads the float table). torchao's quantize_ stores the rest (int8
    per channel), one pass per storage kind. With `example_inputs`, linears that read one input and
    are stored alike become one (shared_input.py)."""
    from torchao.quantization import quantize_

    for m in module.modules():
        if isinstance(m, nn.Embedding):
            # padding_idx only matters for gradients; left set, it hides the embedding from the
            # quant-fusion pattern (embedding_4bit) and to_executorch fails on dequantize_affine.
            m.padding_idx = None
    layers = spec.layers(module)
    if example_inputs is not None:
        layers = share_inputs(module, example_inputs, layers)
    blocks = {name: wq for name, wq in layers.items() if wq.bits == 4 and wq.group_size is not None}
    modules = dict(module.named_modules())
    dynamic = spec.dynamic_int8_activations
    int8_rows = _torchao_config(WeightQuant(bits=8, group_size=None), dynamic, for_linear=True)
    for name, wq in blocks.items():
        layer = modules.pop(name)
        if grid == "symmetric":
            symmetric_blocks_(layer, wq.group_size, dynamic)
        elif isinstance(layer, nn.Embedding):
            offset_embedding(layer, wq.group_size)
        else:
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, offset_linear(layer, wq.group_size, dynamic, int8_rows))
    layers = {name: wq for name, wq in layers.items() if name not in blocks}
    kinds = {(isinstance(m, nn.Linear), layers[name]) for name, m in module.named_modules() if name in layers}
    for for_linear, wq in sorted(kinds, key=lambda k: (k[0], k[1].bits)):  # embeddings first, as before
        config = _torchao_config(wq, for_linear and dynamic, for_linear=for_linear)
        quantize_(module, config, filter_fn=lambda m, fqn, kind=(for_linear, wq):
                  fqn in layers and (isinstance(m, nn.Linear), layers[fqn]) == kind)
    return module


def record_reference(work: _Work) -> None:
    work.reference = quantized_reference(work.module, work.captured)


def export_program(work: _Work) -> None:
    captured = work.captured
    work.program = torch.export.export(work.module, captured.example_inputs,
                                       dynamic_shapes=captured.dynamic_shapes, strict=False)


def lower_to_xnnpack(work: _Work) -> None:
    work.edge = delegate_to_xnnpack(work.program, work.metadata or None)


def delegate_to_xnnpack(program, constant_methods: dict | None):
    """The edge program with XNNPACK's partitions delegated. XNNPACK's partitioner asks ExecuTorch
    to keep its ops (linear, torchao's quantize and dequantize, ...) out of the decompositions and
    to check each such node first; asked without the check, ExecuTorch decomposes the program twice
    instead of three times (on a 3-layer model of S135's shape 19 % less time in this step, the same
    .pte bytes on both grids). Where a kept node is one XNNPACK does not take (a linear layer whose
    weight is an input), ExecuTorch stops, "not decomposed or delegated", and the checked path runs."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    def lowered(partitioner):
        return to_edge_transform_and_lower(program, partitioner=[partitioner], constant_methods=constant_methods)

    unchecked = XnnpackPartitioner()
    kept, _ = unchecked.ops_to_not_decompose(program)
    unchecked.ops_to_not_decompose = lambda _: (kept, None)
    try:
        return lowered(unchecked)
    except RuntimeError as e:
        if "was not decomposed or delegated" not in str(e):
            raise
        return lowered(XnnpackPartitioner())


def to_pte(work: _Work) -> None:
    from executorch.exir import ExecutorchBackendConfig

    # Quant fusion rewrites torchao's dequantize + embedding into quantized_decomposed.embedding_4bit,
    # which has an out-variant kernel; without it to_executorch fails on dequantize_affine.
    program = work.edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))
    work.files[BACKEND.artifact] = program.buffer
    namespaces = {
        str(node.target).split(".")[0].split("::")[0]
        for node in program.exported_program().graph.nodes
        if node.op == "call_function"
    }
    work.kernel_libraries = sorted(lib for ns, (lib, _) in KERNEL_LIBRARIES.items() if ns in namespaces)


STEPS: tuple[Step, ...] = (
    Step("fast path", take_llm_fast_path),
    Step("quantize", quantize_weights),
    Step("reference", record_reference),
    Step("export", export_program),
    Step("lower", lower_to_xnnpack),
    Step("serialize", to_pte),
)


# What an app's LLM runner loads beside the .pte (LM bundles with a tokenizer.json).
RUNNER_TOKENIZER = ("tokenizer/tokenizer.json through ExecuTorch's HFTokenizer (pytorch_tokenizers), as LlmModule "
                    "(Android) and TextLLMRunner (iOS) load it; see tokenizer.runner_check")


def lower(captured: CapturedModel, quant: QuantSpec, options: Options,
          on_step: Callable[[str], None] | None = None) -> Lowered:
    work = run_steps(BACKEND.name, STEPS, _Work(captured, quant, options), on_step)
    metadata, tok = work.metadata, captured.loaded.tokenizer
    facts = {"kernel_libraries": work.kernel_libraries, "constant_methods": dict(sorted(metadata.items()))}
    if work.attention:
        facts["attention"] = work.attention
    if metadata and tok and "tokenizer.json" in tok.files:
        facts["tokenizer"] = RUNNER_TOKENIZER
    return Lowered(
        files=work.files,
        quantization=QuantRecord(quant.describe(), f"torchao {version('torchao')}",
                                 {"delegate": "XNNPACK", "scale_search": {"int4": SCALE_SEARCH, "int8": INT8_SCALE_SEARCH},
                                  **({"grid": options.grid} if quant.scheme == "int4" else {})}),
        # the grid's own cost, as the other backends count it; the .pte's int8 offsets and their scales
        # (and a tied table's second copy) show in its ratio to this ideal
        ideal_bytes=quant.ideal_bytes(captured.module, offsets=lambda wq: on_offset_grid(options.grid, wq)),
        runtime=RuntimeRecord("executorch", version("executorch"), facts),
        reference=work.reference,
        kv_cache=KvCache("float32", "static"),
    )
