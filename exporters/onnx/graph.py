"""Edits of an exported ONNX graph before and after onnxruntime's weight quantizer, and its bytes.

torch.onnx records on each node the module classes and paths it came from
(`pkg.torch.onnx.class_hierarchy`, `pkg.torch.onnx.name_scopes`); that is how the quantizer is told
which MatMul / Gather nodes are the model's linear and embedding layers (the ones the eager
reference fake-quantizes), and which layer each one is (mixed precision stores layers differently).
The records (with stack traces and absolute paths) are then dropped: they would double the file and
leak the build machine's paths into it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from edgepack.exporters.onnx_capture import module_class

# ONNX protobufs cannot exceed 2 GiB; above this the weights go to one external data file.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# What goes to that file, and where: onnx.save_model's defaults (ExternalData.md).
EXTERNAL_DATA_MIN_BYTES = 1024
EXTERNAL_DATA_ALIGN_FROM, EXTERNAL_DATA_ALIGNMENT = 1 << 20, 64 * 1024
# While a graph is rewritten its float weights stay in files (the `folder` of the functions below)
# rather than in the protobuf: a 1B-parameter model's 5 GB would not fit one, and each read takes
# one weight into memory at a time. Smaller new tensors (codes, scales, shapes) are kept inline.
EXTERNAL_MIN_BYTES = 1 << 20


def weight_array(tensor, folder: Path | None) -> np.ndarray:
    """An initializer's values, read from its file under `folder` when the graph keeps it there."""
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor, os.fspath(folder) if folder is not None else "")


def add_weight(graph, array: np.ndarray, name: str, folder: Path | None) -> None:
    """A new initializer: in a file of its own under `folder` when the graph keeps its weights
    there and the array is large, otherwise in the protobuf."""
    from onnx import TensorProto, helper, numpy_helper

    if folder is None or array.nbytes < EXTERNAL_MIN_BYTES:
        graph.initializer.append(numpy_helper.from_array(array, name))
        return
    file = f"{uuid.uuid4().hex}.bin"
    np.ascontiguousarray(array).tofile(folder / file)  # little-endian raw data, as ONNX stores it
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    _point_at(tensor, file, 0, array.nbytes)
    graph.initializer.append(tensor)


def _point_at(tensor, location: str, offset: int, length: int) -> None:
    """Make `tensor` read its values from `length` bytes at `offset` in the file `location`."""
    from onnx import TensorProto

    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def has_external_weights(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


def inline_weights(model, folder: Path | None) -> None:
    """Read the weights kept in files under `folder` into the protobuf (for the final file under
    2 GiB)."""
    if has_external_weights(model):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, os.fspath(folder))
        for tensor in model.graph.initializer:  # as a tensor made in memory is written
            tensor.ClearField("data_location")


def graph_bytes(model) -> int:
    """The graph's size with its weights, wherever they are kept."""
    external = sum(int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "length")
    return model.ByteSize() + external


def check_graph(model, folder: Path | None) -> None:
    """onnx.checker's full check; a graph whose weights are in files under `folder` is checked from
    there (the checker reads a protobuf past 2 GiB only from a path)."""
    import onnx

    if not has_external_weights(model):
        onnx.checker.check_model(model, full_check=True)
        return
    path = folder / f"check-{uuid.uuid4().hex}.onnx"
    onnx.save_model(model, os.fspath(path))  # the weights stay where they are
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    finally:
        path.unlink()


def fold_weight_transposes(model, folder: Path | None = None) -> int:
    """Replace Transpose(initializer) by the transposed initializer. The exporter folds these
    itself except where the initializer has other users (a tied LM head shares the embedding's
    table), and the quantizer only quantizes a MatMul whose weight is an initializer."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    folded = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in initializers:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = np.transpose(weight_array(initializers[node.input[0]], folder), perm)
            add_weight(graph, np.ascontiguousarray(array), node.output[0], folder)
            folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _drop_unused_initializers(graph)
    return len(folded)


def linear_gemms_to_matmuls(model, linear_classes: set[str], folder: Path | None = None) -> int:
    """A linear layer on a 2-D input is exported as Gemm(x, W, b, transB=1), which the quantizer
    leaves alone: rewrite it as MatMul(x, W^T) (+ Add b), keeping the node's trace records."""
    from onnx import helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    rewritten = 0
    for index, node in reversed(list(enumerate(graph.node))):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or module_class(node) not in linear_classes or node.input[1] not in initializers
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        weight = weight_array(initializers[node.input[1]], folder)
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        weight_name = f"{node.input[1]}_matmul"
        add_weight(graph, weight, weight_name, folder)
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


def stack_shared_input_matmuls(model, stored: dict[str, object], folder: Path | None = None) -> dict[str, list[str]]:
    """MatMuls of `stored` (node name -> how its weight is stored) that read one input and are
    stored alike (attention's q, k and v; an MLP's gate and up) become one MatMul on their weights
    side by side, named as the first, and a Split gives each its output. Every quantizer here
    rounds each output column on its own, and the int8 activations are per input block, so the
    values are the same, in one kernel call (and on the offset grid one offset term) instead of
    one each. Returns {stacked node: the nodes it stands for, in order} for the stacks made."""
    from onnx import helper, numpy_helper

    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name in stored and node.input[1] in values:
            groups.setdefault((node.input[0], stored[node.name]), []).append(node)
    stacks = {}
    for group in (g for g in groups.values() if len(g) > 1):
        first = group[0]
        weights = [weight_array(values[n.input[1]], folder) for n in group]
        stacked, widths = f"{first.input[1]}_stacked", f"{first.name}_widths"
        add_weight(graph, np.concatenate(weights, axis=1), stacked, folder)
        graph.initializer.append(numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), widths))
        del weights
        outputs = [n.output[0] for n in group]
        for node in group[1:]:
            graph.node.remove(node)
        index = list(graph.node).index(first)
        first.input[1], first.output[0] = stacked, f"{first.name}_stacked"
        graph.node.insert(index + 1, helper.make_node("Split", [first.output[0], widths], outputs,
                                                      name=f"{first.name}_split", axis=-1))
        stacks[first.name] = [n.name for n in group]
    _drop_unused_initializers(graph)
    return stacks


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def store_int8_per_channel(model, node_names: set[str], quantize_rows, accuracy_level: int,
                           folder: Path | None = None) -> dict[str, int]:
    """Rewrite the named MatMul / Gather nodes to hold int8 weights with one scale per output
    channel (per table row for Gather), quantized by `quantize_rows(weight [out, in] float32) ->
    (q int8 [out, in], scales float32 [out])`. MatMul -> MatMulNBits bits 8 (q + 128 in uint8, its
    zero point 128 implied); its blocks are at most 256 wide, so a row wider than that repeats its
    one scale over blocks of matmul_int8_block(K). Gather -> GatherBlockQuantized bits 8 over uint8,
    one block spanning the whole row (any power of two at least the row's width is accepted).
    Returns {node name: MatMulNBits block} for the MatMuls (their int8 activation blocks)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    blocks = {}
    for node in graph.node:
        if node.name not in node_names:
            continue
        is_matmul = node.op_type == "MatMul"
        weight = weight_array(values[node.input[1 if is_matmul else 0]], folder).astype(np.float32)
        q, scales = quantize_rows(np.ascontiguousarray(weight.T) if is_matmul else weight)
        rows, cols = q.shape
        codes = (q.astype(np.int16) + 128).astype(np.uint8)
        name = node.input[1 if is_matmul else 0]
        if is_matmul:
            block = matmul_int8_block(cols)
            blocks[node.name] = block
            stored = [numpy_helper.from_array(codes.reshape(rows, cols // block, block), f"{name}_Q8"),
                      numpy_helper.from_array(np.repeat(scales.reshape(rows, 1), cols // block, axis=1), f"{name}_scales")]
            attrs = {"K": cols, "N": rows, "bits": 8, "block_size": block}
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            new = helper.make_node("MatMulNBits", [node.input[0], stored[0].name, stored[1].name], list(node.output),
                                   name=f"{node.name}_Q8", domain="com.microsoft", **attrs)
        else:
            gather_axis = _attr(node, "axis") or 0
            stored = [numpy_helper.from_array(codes, f"{name}_Q8"),
                      numpy_helper.from_array(scales.reshape(rows, 1), f"{name}_scales")]
            new = helper.make_node("GatherBlockQuantized", [stored[0].name, node.input[1], stored[1].name],
                                   list(node.output), name=f"{node.name}_Q8", domain="com.microsoft", bits=8,
                                   block_size=max(16, 1 << (cols - 1).bit_length()), gather_axis=gather_axis,
                                   quantize_axis=1)
        graph.initializer.extend(stored)
        node.CopyFrom(new)
    _finish_contrib_rewrite(model, bool(node_names))
    return blocks


def store_int4_blocks(model, node_names: set[str], quantize_blocks, block: int, accuracy_level: int,
                      folder: Path | None = None) -> int:
    """Rewrite the named MatMul / Gather nodes to hold 4-bit blocks, w = scale·(q - 8) (+ offset
    where the grid has a float offset per block), from `quantize_blocks(weight [out, in] float32)
    -> (q uint8 [out, in] in 0..15, scales float16 [out, blocks], offsets)`, offsets None or
    (codes int8 [out, blocks], scales float32 [out, 1]), offset = code·scale.

    MatMulNBits computes scale·(q - 8) (zero point 8 implied, so its fast kernels run); offsets
    add Σ_b (Σ_{k in b} x_k)·offset[n, b]: the block sums (x reshaped into its blocks and
    summed) times offsets^T [blocks, N] (about 1/blocksize of the main product's work). A Gather
    becomes GatherBlockQuantized on the same packed layout plus its rows' offsets spread over
    their blocks (offsets[ids] · E^T, E the 0/1 block-indicator matrix [K, blocks]). A tied table
    (the embedding and the LM head) is stored once: the Gather reads the MatMul's codes, scales
    and offsets.
    Scales are stored fp16 and offsets int8 (4.5 bits a weight without offsets, 4.75 with them;
    5.5 with fp32 scales and offsets); the Casts, Muls, Transposes and Reshapes of these constants
    come first in the graph and onnxruntime folds them when it loads the model, before MatMulNBits
    packs its weights.
    Returns how many tables were stored once for two nodes."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    added: dict[str, object] = {}  # new initializers by name
    prologue: dict[str, object] = {}  # nodes on constants only, by output name
    tables: list[tuple[np.ndarray, str]] = []  # (float table [rows, K], its stored name)

    def const(name: str, array: np.ndarray) -> str:
        if name not in added:
            added[name] = numpy_helper.from_array(array, name)
        return name

    def derived(op: str, inputs: list[str], output: str, **attrs) -> str:
        if output not in prologue:
            prologue[output] = helper.make_node(op, inputs, [output], name=output, **attrs)
        return output

    def as_float(name: str) -> str:
        return derived("Cast", [name], f"{name}_fp32", to=TensorProto.FLOAT)

    def indicator(k: int) -> str:
        return const(f"block_indicator_{k}x{block}", np.kron(np.eye(k // block, dtype=np.float32), np.ones((block, 1), np.float32)))

    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.input)
             if v.type.tensor_type.HasField("shape")}

    def block_sums(x: str, k: int, tag: str) -> list:
        """Each input block's sum: x reshaped to [..., blocks, block] and summed, two cheap nodes
        (a MatMul by the indicator where x's rank is unknown)."""
        if x not in ranks:
            return [helper.make_node("MatMul", [x, indicator(k)], [f"{tag}_block_sums"], name=f"{tag}_block_sums")]
        shape = const(f"blocks_shape_{ranks[x]}d_{k}x{block}", np.array([0] * (ranks[x] - 1) + [k // block, block], np.int64))
        return [helper.make_node("Reshape", [x, shape], [f"{tag}_blocks"], name=f"{tag}_blocks"),
                helper.make_node("ReduceSum", [f"{tag}_blocks", const("last_axis", np.array([-1], np.int64))],
                                 [f"{tag}_block_sums"], name=f"{tag}_block_sums", keepdims=0)]

    # Only a table an embedding could share is kept for the comparison (a 1B model's others are gigabytes).
    gather_shapes = {tuple(values[n.input[0]].dims) for n in graph.node if n.name in node_names and n.op_type == "Gather"}

    def store(table: np.ndarray, name: str) -> tuple[str, bool]:
        for known, stored_name in tables:
            if known.shape == table.shape and np.array_equal(known, table):
                return stored_name, True
        q, scales, offsets = quantize_blocks(table)
        rows, cols = q.shape
        const(f"{name}_Q4", (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(rows, cols // block, block // 2))
        const(f"{name}_scales", scales.astype(np.float16))
        if offsets is not None:
            const(f"{name}_offsets", offsets[0].astype(np.int8))
            const(f"{name}_offset_scales", offsets[1].astype(np.float32))
        if table.shape in gather_shapes:
            tables.append((table, name))
        return name, False

    rewritten: list[tuple[int, list]] = []
    shared = 0
    order = sorted(((i, n) for i, n in enumerate(graph.node) if n.name in node_names),
                   key=lambda item: item[1].op_type != "MatMul")  # MatMuls first: a tied Gather reuses the head's table
    for index, node in order:
        is_matmul = node.op_type == "MatMul"
        weight_name = node.input[1 if is_matmul else 0]
        weight = weight_array(values[weight_name], folder).astype(np.float32)
        table = np.ascontiguousarray(weight.T) if is_matmul else weight  # [rows, K]
        name, reused = store(table, weight_name)
        shared += reused and not is_matmul
        rows, cols = table.shape
        codes, scales = f"{name}_Q4", as_float(f"{name}_scales")
        with_offsets = f"{name}_offsets" in added
        out, tag = node.output[0], node.name
        blocks_out = f"{tag}_sym" if with_offsets else out
        if is_matmul:
            attrs = {"K": cols, "N": rows, "bits": 4, "block_size": block}
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            nodes = [helper.make_node("MatMulNBits", [node.input[0], codes, scales], [blocks_out], name=f"{tag}_Q4",
                                      domain="com.microsoft", **attrs)]
        else:
            rows_of = derived("Reshape", [codes, const(f"rows_{rows}", np.array([rows, -1], np.int64))], f"{codes}_rows")
            nodes = [helper.make_node("GatherBlockQuantized", [rows_of, node.input[1], scales], [blocks_out], name=f"{tag}_Q4",
                                      domain="com.microsoft", bits=4, block_size=block, gather_axis=0, quantize_axis=1)]
        if with_offsets:
            offsets = derived("Mul", [as_float(f"{name}_offsets"), f"{name}_offset_scales"], f"{name}_block_offsets")
            if is_matmul:
                offsets_t = derived("Transpose", [offsets], f"{offsets}_t", perm=[1, 0])
                nodes += [*block_sums(node.input[0], cols, tag),
                          helper.make_node("MatMul", [f"{tag}_block_sums", offsets_t], [f"{tag}_offset_term"],
                                           name=f"{tag}_offset_term")]
            else:
                spread = derived("Transpose", [indicator(cols)], f"{indicator(cols)}_t", perm=[1, 0])
                nodes += [helper.make_node("Gather", [offsets, node.input[1]], [f"{tag}_row_offsets"], name=f"{tag}_offsets", axis=0),
                          helper.make_node("MatMul", [f"{tag}_row_offsets", spread], [f"{tag}_offset_term"],
                                           name=f"{tag}_offset_term")]
            nodes.append(helper.make_node("Add", [f"{tag}_sym", f"{tag}_offset_term"], [out], name=f"{tag}_add_offsets"))
        rewritten.append((index, nodes))
    for index, nodes in sorted(rewritten, key=lambda item: item[0], reverse=True):
        del graph.node[index]
        for offset, new in enumerate(nodes):
            graph.node.insert(index + offset, new)
    for offset, node in enumerate(prologue.values()):
        graph.node.insert(offset, node)
    graph.initializer.extend(added.values())
    _finish_contrib_rewrite(model, bool(node_names))
    return shared


def _finish_contrib_rewrite(model, rewrote: bool) -> None:
    """After nodes became onnxruntime contrib ops: import their domain once, drop the float weights."""
    from onnx import helper

    if rewrote and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(model.graph)


def matmul_int8_block(k: int) -> int:
    """The widest MatMulNBits block (16 .. 256, a power of two) that divides K; 0 if none does."""
    return next((b for b in (256, 128, 64, 32, 16) if k % b == 0), 0)


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


def quantized_op_bits(model) -> dict[str, dict[str, int]]:
    """{op type: {bits: count}} for MatMulNBits and GatherBlockQuantized (4 where the attribute is
    absent: the quantizer's int4 tables)."""
    counts: dict[str, dict[str, int]] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            by_bits = counts.setdefault(node.op_type, {})
            bits = str(_attr(node, "bits") or 4)
            by_bits[bits] = by_bits.get(bits, 0) + 1
    return {op: dict(sorted(b.items())) for op, b in sorted(counts.items())}


def serialize(model, file_name: str, folder: Path | None = None) -> dict[str, bytes]:
    """The model as files keyed by name: `file_name` alone, or with `<file_name>.data` holding the
    weights when the protobuf would pass 2 GiB (the external data location is relative, so the two
    files must stay side by side). Weights kept in files under `folder` are read from there; past
    2 GiB they go straight into the data file, never into one protobuf, which could not hold them."""
    if graph_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        inline_weights(model, folder)
        return {file_name: model.SerializeToString(deterministic=True)}
    return _with_weights_beside(model, file_name, folder)


def _with_weights_beside(model, file_name: str, folder: Path | None) -> dict[str, bytes]:
    """`file_name` with every initializer of at least EXTERNAL_DATA_MIN_BYTES in `<file_name>.data`,
    laid out as onnx.save_model lays it out (tensors from 1 MiB up start on a 64 KiB boundary, so
    onnxruntime can map them). The data is read into one buffer, each weight once, and returned as
    that bytearray (bytes-like, not copied again: 6 GB for a 1B float model); `model` itself is left
    as it was."""
    from onnx import ModelProto
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    copy = ModelProto()
    copy.CopyFrom(model)  # small: the weights are in files, or inline under 2 GiB in all
    placed, size = [], 0
    for tensor in copy.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            source, start, length = folder / info.location, info.offset or 0, info.length
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_DATA_MIN_BYTES:
            source, start, length = None, 0, len(tensor.raw_data)
        else:
            continue
        if length >= EXTERNAL_DATA_ALIGN_FROM:
            size = -(-size // EXTERNAL_DATA_ALIGNMENT) * EXTERNAL_DATA_ALIGNMENT
        placed.append((tensor, source, start, length, size))
        size += length
    data = bytearray(size)
    view = memoryview(data)
    for tensor, source, start, length, offset in placed:
        if source is None:
            view[offset:offset + length] = tensor.raw_data
            tensor.ClearField("raw_data")
        else:
            with open(source, "rb") as f:
                f.seek(start)
                if f.readinto(view[offset:offset + length]) != length:
                    raise RuntimeError(f"weight {tensor.name}: {source.name} holds fewer than {length} bytes from {start}")
        _point_at(tensor, f"{file_name}.data", offset, length)
    return {file_name: copy.SerializeToString(deterministic=True), f"{file_name}.data": data}
