"""The coremltools half of the CoreML lowering, run in a child process with a fixed hash seed.

Why a child: coremltools' torch front end picks among symbolic dimensions held in Python sets
("Recklessly broadcast {is14, is18} to is14"), so which ops it emits depends on the interpreter's
string-hash seed; two exports of the same model in two processes gave different model.mlmodel
bytes. PYTHONHASHSEED can only be set when an interpreter starts, so exporters/coreml/lower.py saves
the ExportedProgram and a JSON job into a temporary directory and runs
`python -m edgepack.exporters.coreml.convert DIR` with PYTHONHASHSEED=0. The child converts,
compresses, writes the metadata and saves DIR/model.mlpackage, then writes DIR/result.json; a
failure is reported there with the name of the step that failed.

Job (job.json): inputs [{name, dtype, shape: [int | [min, max, default]]}], outputs [{name,
dtype}], states [{name, shape}], ios_target, precision, compression, group_size,
palette_group_channels, offset_dtype, weights {placeholder: storage}, metadata {author, version,
short_description, user, descriptions}.

Storage (one per weight, so one program can mix them): "int4_offset" (per block of group_size
along the input, each block its own min..max: uint4 codes, a scale and a float offset),
"int4" (the same blocks on coremltools' symmetric grid), "int8" (per output channel) or
"palettize4". `weights` names each quantized weight by its
placeholder in the saved ExportedProgram, which is also the name coremltools' torch front end gives
its const ("p_model_encoder_layer_0_attention_self_value_weight"; "_to_fp16" is appended when the
fp16 pass casts it, "_quantized" / "_palettized" when it is compressed). A weight const the map does
not name is stored as `compression` says; a weight stored otherwise must be found, or the step fails.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

# Ops coremltools emits for compressed weights; the quantize step counts them.
COMPRESSED_WEIGHT_OPS = ("constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "constexpr_affine_dequantize")
_NP = {"int32": np.int32, "float32": np.float32, "float16": np.float16, "bool": np.bool_}


class StepFailed(Exception):
    def __init__(self, step: str, message: str):
        super().__init__(message)
        self.step = step


def count_ops(mlmodel) -> Counter:
    return Counter(op.op_type for f in mlmodel._mil_program.functions.values() for op in f.operations)


def convert(program, job: dict):
    import coremltools as ct

    inputs = [ct.TensorType(name=i["name"], dtype=_NP[i["dtype"]],
                            shape=tuple(ct.RangeDim(*d) if isinstance(d, list) else d for d in i["shape"]))
              for i in job["inputs"]]
    outputs = [ct.TensorType(name=o["name"], dtype=_NP.get(o["dtype"])) for o in job["outputs"]]
    # CoreML states are fp16 only (the converter would cast fp32 buffers and say so).
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(s["shape"]), dtype=np.float16), name=s["name"])
              for s in job["states"]]
    return ct.convert(
        program, inputs=inputs, outputs=outputs, states=states or None, convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, f"iOS{job['ios_target']}"),
        compute_precision=ct.precision.FLOAT16 if job["precision"] == "fp16" else ct.precision.FLOAT32,
        skip_model_load=True,
    )


def quantizable_consts(mlmodel) -> list[str]:
    """Const weights of linear and gather (embedding) ops: exactly the layers the QuantSpec names."""
    found = []
    for function in mlmodel._mil_program.functions.values():
        for op in function.operations:
            weight = {"linear": "weight", "gather": "x"}.get(op.op_type)
            var = getattr(op, weight, None) if weight else None
            if var is not None and var.op is not None and var.op.op_type == "const" and var.rank == 2:
                found.append(var.op.name)
    return sorted(set(found))


# What coremltools appends to a weight const's name: the fp16 cast, then the compression op.
_NAME_SUFFIXES = ("_quantized", "_palettized", "_to_fp16")


def weight_placeholder(name: str) -> str:
    """The ExportedProgram placeholder a weight const, or the op that compressed it, was made from."""
    for suffix in _NAME_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def planned_storage(targets: list[str], job: dict) -> dict[str, str]:
    """Target const name -> its storage (see the module docstring)."""
    planned, default = job["weights"], job["compression"]
    storage = {name: planned.get(weight_placeholder(name), default) for name in targets}
    found = {weight_placeholder(name) for name in targets}
    lost = sorted(p for p, kind in planned.items() if kind != default and p not in found)
    if lost:
        raise StepFailed("quantize", f"{len(lost)} weight(s) to store otherwise than {default} have no linear or "
                                     f"gather const in the converted program: {', '.join(lost[:5])}")
    return storage


def stored_kind(op, group_size: int | None) -> str:
    """How a compression op stores its weight, in planned_storage's terms (anything else spelled out)."""
    from coremltools.converters.mil.mil import types

    if op.op_type == "constexpr_lut_to_dense":
        return "palettize4" if op.lut.shape[-2] == 16 else f"palette of {op.lut.shape[-2]}"
    if op.op_type == "constexpr_affine_dequantize":  # iOS 17: int8 per channel
        return types.builtin_to_string(op.quantized_data.dtype)
    dtype, blocks = types.builtin_to_string(op.data.dtype), op.scale.shape[-1]
    if dtype == "int8" and blocks == 1:
        return "int8"
    block = op.data.shape[-1] // blocks
    if block == group_size and dtype == "int4" and op.offset is None:
        return "int4"
    if block == group_size and dtype == "uint4" and op.offset is not None and types.is_float(op.offset.dtype):
        return "int4_offset"
    return f"{dtype} block {block}"


def store_offset_blocks(mlmodel, names: set[str], group_size: int, dtype: str):
    """Replace each named weight const by constexpr_blockwise_shift_scale(uint4 codes, scale,
    float offset): weights.OffsetGrid's blocks. coremltools' own quantizer has no such mode (its
    'linear' mode rounds the offset to an integer and widens each block's range to hold 0)."""
    import torch
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass

    from edgepack.exporters.weights import OffsetGrid

    grid = OffsetGrid(getattr(torch, dtype))

    class StoreOffsetBlocks(AbstractGraphPass):
        def apply(self, prog):
            for function in prog.functions.values():
                for op in [op for op in function.operations if op.op_type == "const" and op.name in names]:
                    q, scale, offset = grid.blocks(torch.from_numpy(np.asarray(op.val.val)), group_size)
                    with function:
                        stored = mb.constexpr_blockwise_shift_scale(
                            data=q.numpy().astype(types.np_uint4_dtype), scale=scale.numpy(), offset=offset.numpy(),
                            before_op=op, name=op.name + "_quantized")
                    op.enclosing_block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=stored)
                    op.enclosing_block.remove_ops([op])

    return _apply_graph_pass(mlmodel, StoreOffsetBlocks(), skip_model_load=True)


def compress(mlmodel, job: dict):
    import coremltools as ct
    from coremltools.optimize.coreml import (
        OpLinearQuantizerConfig,
        OpPalettizerConfig,
        OptimizationConfig,
        linear_quantize_weights,
        palettize_weights,
    )

    if job["compression"] == "none":
        return mlmodel, {}, {}
    storage = planned_storage(quantizable_consts(mlmodel), job)
    configs = {
        "int4": OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                        block_size=job["group_size"], weight_threshold=0),
        "int8": OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                        weight_threshold=0),
        "palettize4": OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel",
                                         group_size=job["palette_group_channels"], weight_threshold=0),
    }
    # Named consts only (every linear and embedding weight, whatever its size), each with its own
    # config, so the artifact stores what the QuantSpec says while norms and biases stay in the
    # compute precision. Linear quantization first, palettes for the rest, the offset grid last.
    for fn, kinds in ((linear_quantize_weights, ("int4", "int8")), (palettize_weights, ("palettize4",))):
        named = {name: configs[kind] for name, kind in storage.items() if kind in kinds}
        if named:
            mlmodel = fn(mlmodel, OptimizationConfig(op_name_configs=named))
    offset = {name for name, kind in storage.items() if kind == "int4_offset"}
    if offset:
        mlmodel = store_offset_blocks(mlmodel, offset, job["group_size"], job["offset_dtype"])
    ops = count_ops(mlmodel)
    found = {k: ops[k] for k in COMPRESSED_WEIGHT_OPS if ops[k]}
    stored = {weight_placeholder(op.name): stored_kind(op, job["group_size"])
              for f in mlmodel._mil_program.functions.values() for op in f.operations
              if op.op_type in COMPRESSED_WEIGHT_OPS}
    # coremltools has shipped releases where compression silently did nothing: check every weight.
    wrong = {name: stored.get(weight_placeholder(name), "uncompressed") for name, kind in storage.items()
             if stored.get(weight_placeholder(name)) != kind}
    if wrong:
        listed = ", ".join(f"{n} {wrong[n]}, not {storage[n]}" for n in sorted(wrong)[:5])
        raise StepFailed("quantize", f"{len(wrong)} of {len(storage)} weights are not stored as planned ({listed}); "
                                     f"the program has {found}; coremltools {ct.__version__}")
    return mlmodel, found, dict(sorted(stored.items()))


def add_metadata(mlmodel, meta: dict) -> None:
    mlmodel.author = meta["author"]
    mlmodel.version = meta["version"]
    mlmodel.short_description = meta["short_description"]
    mlmodel.user_defined_metadata.update(meta["user"])
    for name, text in meta["descriptions"].items():
        if name in mlmodel.input_description:
            mlmodel.input_description[name] = text
        elif name in mlmodel.output_description:
            mlmodel.output_description[name] = text


def run(workdir: Path) -> dict:
    import torch

    job = json.loads((workdir / "job.json").read_text())
    times: dict[str, float] = {}
    step = "convert"
    try:
        start = time.perf_counter()
        mlmodel = convert(torch.export.load(workdir / "program.pt2"), job)
        times[step] = time.perf_counter() - start
        step, start = "quantize", time.perf_counter()
        mlmodel, compressed, stored = compress(mlmodel, job)
        times[step] = time.perf_counter() - start
        step, start = "metadata", time.perf_counter()
        add_metadata(mlmodel, job["metadata"])
        times[step] = time.perf_counter() - start
        step, start = "save", time.perf_counter()
        mlmodel.save(str(workdir / "model.mlpackage"))
        times[step] = time.perf_counter() - start
    except StepFailed as e:
        return {"failed_step": e.step, "error": str(e)}
    except Exception as e:  # the converter's own exception, named by step, traceback kept for --verbose
        return {"failed_step": step, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    return {
        "compressed_ops": compressed,
        "stored_weights": stored,
        "op_counts": dict(sorted(count_ops(mlmodel).items())),
        "specification_version": mlmodel.get_spec().specificationVersion,
        "step_seconds": {k: round(v, 3) for k, v in times.items()},
    }


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    (directory / "result.json").write_text(json.dumps(run(directory)))
