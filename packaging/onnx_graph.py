"""Edits of an exported ONNX graph before and after onnxruntime's weight quantizer, and its bytes.

torch.onnx records on each node the module classes it came from (`pkg.torch.onnx.class_hierarchy`);
that is how the quantizer is told which MatMul / Gather nodes are the model's linear and embedding
layers (the ones the eager reference fake-quantizes), and nothing else. The records (with stack
traces and absolute paths) are then dropped: they would double the file and leak the build machine's
paths into it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

_CLASSES = "pkg.torch.onnx.class_hierarchy"
# ONNX protobufs cannot exceed 2 GiB; above this the weights go to one external data file.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def _module_class(node) -> str | None:
    """The innermost nn.Module class a node was traced in (the entry before the aten op)."""
    for prop in node.metadata_props:
        if prop.key == _CLASSES:
            classes = [c.strip(" '\"") for c in prop.value.strip("[]").split(",")]
            return classes[-2] if len(classes) >= 2 else None
    return None


def fold_weight_transposes(model) -> int:
    """Replace Transpose(initializer) by the transposed initializer. The exporter folds these
    itself except where the initializer has other users (a tied LM head shares the embedding's
    table), and the quantizer only quantizes a MatMul whose weight is an initializer."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    folded = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in initializers:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = np.transpose(numpy_helper.to_array(initializers[node.input[0]]), perm)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), node.output[0]))
            folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _drop_unused_initializers(graph)
    return len(folded)


def linear_gemms_to_matmuls(model, linear_classes: set[str]) -> int:
    """A linear layer on a 2-D input is exported as Gemm(x, W, b, transB=1), which the quantizer
    leaves alone: rewrite it as MatMul(x, W^T) (+ Add b), keeping the node's trace records."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    rewritten = 0
    for index, node in reversed(list(enumerate(graph.node))):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or _module_class(node) not in linear_classes or node.input[1] not in initializers
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        weight_name = f"{node.input[1]}_matmul"
        graph.initializer.append(numpy_helper.from_array(weight, weight_name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        replacement = [helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{node.name}_matmul")]
        if has_bias:
            replacement.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        for new in replacement:
            new.metadata_props.extend(node.metadata_props)
        del graph.node[index]
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)
        rewritten += 1
    _drop_unused_initializers(graph)
    return rewritten


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def class_names(module, kind: type) -> set[str]:
    """The qualified names of `module`'s submodule classes that are `kind` or subclass it (e.g.
    Gemma's scaled word embedding), as the trace records name them."""
    return {f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules() if isinstance(m, kind)}


def weight_nodes(model, op_type: str, module_classes: set[str]) -> tuple[list[str], list[str]]:
    """(names of `op_type` nodes traced directly inside one of `module_classes` whose weight is an
    initializer, names of the other `op_type` nodes with an initializer weight)."""
    initializers = {t.name for t in model.graph.initializer}
    weight_input = 1 if op_type == "MatMul" else 0
    chosen, other = [], []
    for node in model.graph.node:
        if node.op_type != op_type or node.input[weight_input] not in initializers:
            continue
        (chosen if _module_class(node) in module_classes else other).append(node.name)
    return chosen, other


def share_tied_tables(model) -> int:
    """A tied LM head and embedding are quantized twice by the quantizer (as a MatMulNBits weight
    and as a GatherBlockQuantized table) to the same values. GatherBlockQuantized also reads
    MatMulNBits' packed layout (uint8 rows of 4-bit values, zero point 8, `bits` 4: how
    onnxruntime-genai's builder ties them), so the embedding reads the head's weight and its own
    copy goes. Tables are matched by content, so only truly identical ones are shared."""
    from onnx import helper, numpy_helper

    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    heads = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits" and _attr(node, "bits") == 4:
            packed = numpy_helper.to_array(values[node.input[1]])
            n, k = _attr(node, "N"), _attr(node, "K")
            q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1)[:, :k].astype(np.int8) - 8
            heads[node.input[1]] = (node, q, numpy_helper.to_array(values[node.input[2]]))
    reshapes = []
    for gather in [n for n in graph.node if n.op_type == "GatherBlockQuantized" and len(n.input) == 3]:
        table = numpy_helper.to_array(values[gather.input[0]]).astype(np.int8)
        scales = numpy_helper.to_array(values[gather.input[2]])
        for weight, (head, q, head_scales) in heads.items():
            if (_attr(head, "block_size") == _attr(gather, "block_size") and q.shape == table.shape
                    and np.array_equal(q, table) and np.array_equal(head_scales.reshape(scales.shape), scales)):
                rows = f"{weight}_rows"
                graph.initializer.append(numpy_helper.from_array(np.array([q.shape[0], -1], np.int64), f"{rows}_shape"))
                reshapes.append(helper.make_node("Reshape", [weight, f"{rows}_shape"], [rows], name=f"{gather.name}_rows"))
                gather.input[0], gather.input[2] = rows, head.input[2]
                gather.attribute.append(helper.make_attribute("bits", 4))
                break
    for node in reshapes:
        graph.node.insert(0, node)
    _drop_unused_initializers(graph)
    return len(reshapes)


def _attr(node, name: str):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def strip_trace_records(model) -> None:
    for node in model.graph.node:
        del node.metadata_props[:]
    for value in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        del value.metadata_props[:]
    for tensor in model.graph.initializer:
        del tensor.metadata_props[:]


def op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def serialize(model, file_name: str) -> dict[str, bytes]:
    """The model as files keyed by name: `file_name` alone, or with `<file_name>.data` holding the
    weights when the protobuf would pass 2 GiB (the external data location is relative, so the two
    files must stay side by side)."""
    import onnx

    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        return {file_name: model.SerializeToString(deterministic=True)}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model moves the weights of the proto it is given out of it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file_name
        onnx.save_model(copy, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{file_name}.data", size_threshold=1024)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}
