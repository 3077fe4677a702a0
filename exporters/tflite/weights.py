"""The weights as TFLite stores them: ai_edge_quantizer's grid, which ops the converter made of
each layer, and what it did to their weights.

Ops cannot be told apart by name (litert_torch fuses several modules' paths into one tensor
name), so a layer is found by its weight: `layer_ops` matches each layer's float weight against
the converted model's, which is how a recipe can store one layer otherwise than its kind (mixed
precision), and `stored_weights` reads back how the quantized model stores each op.

litert's converter sometimes folds a norm's affine into the linear layers the norm feeds (BERT's
post-LayerNorm into q/k/v and the MLP; not GPT-2's pre-LayerNorm nor Llama's RMSNorm, measured
2026-11-23 with litert-torch 0.10), so the stored int4 weights are quant(W·γ), not quant(W)·γ.
Rather than guess the converter's rules, the reference asks the artifact: the stored weights are
dequantized (exactly, in float32) and a candidate layer counts as folded when its folded
quantization is among them. Embedding tables are asked the same way whether they were quantized
at all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from edgepack.errors import InputError
from edgepack.exporters.weights import Rounding
from edgepack.quant import QuantSpec, WeightQuant
from edgepack.stages import CapturedModel


@dataclass(frozen=True)
class StoredWeight:
    """One op's constant weight (FULLY_CONNECTED: input 1; EMBEDDING_LOOKUP: input 1, the table).
    Its values are read when asked for, by rows: a quantized model's weights all dequantized at
    once are the model's size in float32 (4.6 GiB at Llama-3.2-1B's shape), and most callers need
    only the storage, or compare a weight a slice of rows at a time."""

    scope: str  # the op's scope as ai_edge_quantizer names it (its outputs' names): what a recipe regex matches
    shape: tuple[int, int]  # [rows, the rest]
    storage: WeightQuant | None  # None: stored float
    rows: Callable[[slice], np.ndarray] = field(repr=False, compare=False)

    @property
    def values(self) -> np.ndarray:
        """float32; dequantized exactly when stored quantized (a view of the model when stored float)."""
        return self.rows(slice(None))


def stored_weights(model: bytes, operator: str) -> list[StoredWeight]:
    """The constant weight of every `operator` op in every subgraph: its input 1, or a weight-only
    quantized one's stored constant (what the DEQUANTIZE feeding it reads)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils.tfl_flatbuffer_utils import get_op_scope

    m = schema.ModelT.InitFromPackedBuf(model, 0)
    wanted = getattr(schema.BuiltinOperator, operator)

    def code_of(op) -> int:
        code = m.operatorCodes[op.opcodeIndex]
        return max(code.builtinCode, code.deprecatedBuiltinCode)

    found = []
    for graph in m.subgraphs:
        dequantized = {op.outputs[0]: op.inputs[0] for op in graph.operators
                       if code_of(op) == schema.BuiltinOperator.DEQUANTIZE}
        for op in graph.operators:
            if code_of(op) != wanted:
                continue
            weight = dequantized.get(op.inputs[1], op.inputs[1])
            read = _read(m, model, graph, graph.tensors[weight], schema)
            if read is not None:
                found.append(StoredWeight(get_op_scope(op, graph.tensors), *read))
    return found


def _buffer(m, model: bytes, index: int) -> np.ndarray | None:
    """A buffer's bytes as a read-only uint8 view of `model`, not a copy (a float model's weights
    are all read at once: a copy was 1.4 GB more at SmolLM2-360M's shape): inline, or (larger
    models) after the flatbuffer at offset/size."""
    buffer = m.buffers[index]
    if buffer.data is not None and len(buffer.data):
        return np.asarray(buffer.data, np.uint8)  # the object API's view of `model`
    if buffer.offset > 1 and buffer.size:
        return np.frombuffer(model, np.uint8, count=buffer.size, offset=buffer.offset)
    return None


def _read(m, model: bytes, graph, tensor, schema) -> tuple[tuple[int, int], WeightQuant | None, Callable] | None:
    """A constant weight's shape, storage and reader of its float32 values by rows, or None."""
    raw = _buffer(m, model, tensor.buffer)
    if raw is None:  # not a stored constant (e.g. an activation)
        return None
    rows, q = int(tensor.shape[0]), tensor.quantization
    shape = (rows, int(np.prod(tensor.shape[1:])))
    if tensor.type == schema.TensorType.FLOAT32:
        return shape, None, lambda part: raw.view(np.float32).reshape(shape)[part]
    bits = {schema.TensorType.INT4: 4, schema.TensorType.INT8: 8}.get(tensor.type)
    if bits is None or q is None:
        return None

    def codes(part: slice) -> np.ndarray:
        start, stop, _ = part.indices(rows)
        if bits == 8:
            return raw.view(np.int8).reshape(shape)[start:stop].astype(np.float32)
        first, count = start * shape[1], (stop - start) * shape[1]  # int4: two a byte, low nibble first
        packed = raw[first // 2:(first + count + 1) // 2]
        nibbles = np.stack([packed & 15, packed >> 4], -1).reshape(-1)[first % 2:first % 2 + count].astype(np.int8)
        return np.where(nibbles > 7, nibbles - 16, nibbles).reshape(stop - start, shape[1]).astype(np.float32)

    if q.details is not None and hasattr(q.details, "blockSize"):
        scales_tensor = graph.tensors[q.details.scales]
        dtype = np.float16 if scales_tensor.type == schema.TensorType.FLOAT16 else np.float32
        scales = _buffer(m, model, scales_tensor.buffer).view(dtype).reshape(rows, -1)

        def blocks(part: slice) -> np.ndarray:
            c, s = codes(part), scales[part].astype(np.float32)
            return (c.reshape(len(c), s.shape[1], -1) * s[..., None]).reshape(c.shape)

        return shape, WeightQuant(bits, q.details.blockSize), blocks
    if q.scale is not None and len(q.scale):
        scale = np.asarray(q.scale, np.float32).reshape(-1, 1)
        return shape, WeightQuant(bits, None), lambda part: codes(part) * scale[part]
    return None


def rounding(bits: int, blockwise: bool) -> Rounding:
    """ai_edge_quantizer's symmetric grid (uniform_quantize_tensor.py): full range -8..7 below 8
    bits, narrow -127..127 at 8; scale = max|w| / qmax; blockwise scales keep 7 mantissa bits."""
    base = Rounding.symmetric(bits, narrow=bits >= 8)
    return Rounding(base.qmin, base.qmax, float(base.qmax), torch.bfloat16 if blockwise else None)


def grid_for(spec: QuantSpec, module: torch.nn.Module) -> Callable[[int], Rounding]:
    """ai_edge_quantizer's grid for each bit width the spec stores: bfloat16 scales where that
    width is stored blockwise. The reference picks a grid by bit width alone, so a width stored
    both blockwise and per channel in one model would be refused here rather than misread."""
    blockwise: dict[int, bool] = {}
    for name, wq in spec.layers(module).items():
        if blockwise.setdefault(wq.bits, wq.group_size is not None) != (wq.group_size is not None):
            raise InputError(f"{name}: int{wq.bits} is stored both blockwise and per channel in one model",
                             hint="give each bit width one granularity for --target tflite")
    return lambda bits: rounding(bits, blockwise[bits])


def fold_multipliers(captured: CapturedModel) -> tuple[float, ...]:
    """What the converter may fold into a linear weight after a norm's γ: 1, or attention's
    1/sqrt(head_dim) whole or split between q and k."""
    head_dim = captured.loaded.facts.head_dim if captured.loaded.facts else None
    return (1.0, head_dim ** -0.25, head_dim ** -0.5) if head_dim else (1.0,)


OPERATORS = {torch.nn.Linear: "FULLY_CONNECTED", torch.nn.Embedding: "EMBEDDING_LOOKUP"}  # what each layer becomes


def operator_of(layer: torch.nn.Module) -> str:
    return next(op for kind, op in OPERATORS.items() if isinstance(layer, kind))


def layer_ops(float_model: bytes, layers: dict[str, torch.nn.Module], norm_fed: dict,
              multipliers: tuple[float, ...]) -> dict[str, list[str]]:
    """The scopes of the ops each layer (name -> nn.Linear / nn.Embedding) became in the converted
    float model: those whose float weight is the layer's weight, or for a layer a norm feeds
    (norm_fed: name -> NormAffine) what the converter's fold makes of it, W·γ·m."""
    stored = {op: _by_shape(stored_weights(float_model, op)) for op in OPERATORS.values()}
    found = {}
    for name, layer in layers.items():
        weight, affine = layer.weight.detach(), norm_fed.get(name)
        images = [weight] + ([weight * affine.scale * m for m in multipliers] if affine else [])
        scopes = {w.scope for image in images for w in stored[operator_of(layer)].get(tuple(image.shape), [])
                  if _same(image.numpy(), w, rtol=1e-5, atol=1e-7)}
        if scopes:
            found[name] = sorted(scopes)
    return found


def layer_storage(model: bytes, ops: dict[str, list[str]]) -> dict[str, set[WeightQuant | None]]:
    """How `model` stores each layer's ops (ops: layer -> scopes, from layer_ops)."""
    storage = {w.scope: w.storage for op in OPERATORS.values() for w in stored_weights(model, op)}
    return {name: {storage.get(scope) for scope in scopes} for name, scopes in ops.items()}


def folded_layers(model: bytes, candidates: dict, weights: dict[str, torch.Tensor],
                  quantize: Callable[[str, torch.Tensor], torch.Tensor], multipliers: tuple[float, ...] = (1.0,)) -> dict:
    """The subset of `candidates` (layer name -> NormAffine) whose stored weight is the folded
    quantization quantize(name, W·γ·m) for one of `multipliers` (the converter also folds
    attention's 1/sqrt(head_dim), split between q and k, into their weights, after γ: (W·γ)·m,
    which can round a bfloat16 scale differently from W·(γ·m)), returned with that multiplier.
    Compared to 1e-6: γ is measured (NormAffine) to ~1e-7."""
    if not candidates:  # nothing to look for (a decoder's linears on the offset grid): read nothing
        return {}
    stored = _by_shape(_quantized(model, "FULLY_CONNECTED"))
    folded = {}
    for name, affine in candidates.items():
        for m in multipliers:
            scaled = type(affine)(affine.scale, affine.shift, m)
            expected = quantize(name, weights[name] * scaled.scale * scaled.multiplier).numpy()
            if _stored(expected, stored):
                folded[name] = scaled
                break
    return folded


def quantized_tables(model: bytes, tables: dict[str, torch.Tensor],
                     quantize: Callable[[str, torch.Tensor], torch.Tensor]) -> set[str]:
    """The embedding tables (name -> weight) stored quantized as an EMBEDDING_LOOKUP table. The
    others never reached the quantizer: the converter folded their lookup into a float constant
    (BERT's position and token-type embeddings at a fixed sequence length)."""
    stored = _by_shape(_quantized(model, "EMBEDDING_LOOKUP"))
    return {name for name, weight in tables.items() if _stored(quantize(name, weight).numpy(), stored)}


def _quantized(model: bytes, operator: str) -> list[StoredWeight]:
    return [w for w in stored_weights(model, operator) if w.storage is not None]


def _by_shape(weights: list[StoredWeight]) -> dict[tuple, list[StoredWeight]]:
    """Stored weights grouped by shape: only those of the same shape are worth comparing."""
    grouped: dict[tuple, list[StoredWeight]] = {}
    for w in weights:
        grouped.setdefault(w.shape, []).append(w)
    return grouped


COMPARED_AT_ONCE = 1 << 22  # values: a 1B model's tied table compared whole held 3 more float copies of it


def _same(expected: np.ndarray, stored: StoredWeight, rtol: float, atol: float) -> bool:
    """allclose, the first row first (most candidates differ there), then a slice of rows at a time."""
    rows, width = stored.shape
    step = max(1, COMPARED_AT_ONCE // max(1, width))
    for part in [slice(0, 1), *(slice(start, start + step) for start in range(0, rows, step))]:
        if not np.allclose(np.asarray(expected[part], np.float32), stored.rows(part), rtol=rtol, atol=atol):
            return False
    return True


def _stored(expected: np.ndarray, stored: dict[tuple, list[StoredWeight]]) -> bool:
    return any(_same(expected, w, rtol=0, atol=1e-6) for w in stored.get(expected.shape, []))


def nonzero_weight_scales(model: bytes) -> bytes:
    """ai_edge_quantizer gives an all-zero block (or channel) of a weight the scale 0 (max|w| / qmax),
    and XNNPACK refuses a quantized weight with a zero scale ("unsupported scale value (0.000000)"),
    so the whole .tflite fails to load: seen with a pad row of an embedding tied to the LM head.
    Every code of such a block is 0, so any scale stores the same zeros: 1.0 is written in place."""
    from ai_edge_litert import schema_py_generated as schema

    data = bytearray(model)  # the accessors' numpy views are then writable views of `data`
    m = schema.Model.GetRootAs(data, 0)
    done: set[int] = set()
    for g in range(m.SubgraphsLength()):
        graph = m.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor, q = graph.Tensors(t), graph.Tensors(t).Quantization()
            if tensor.Type() not in (schema.TensorType.INT4, schema.TensorType.INT8) or q is None or tensor.Buffer() in done:
                continue
            done.add(tensor.Buffer())
            if q.DetailsType() == schema.QuantizationDetails.BlockwiseQuantization:
                details = schema.BlockwiseQuantization()
                details.Init(q.Details().Bytes, q.Details().Pos)
                holder = graph.Tensors(details.Scales())
                dtype = np.float16 if holder.Type() == schema.TensorType.FLOAT16 else np.float32
                scales = writable_buffer(m, data, holder.Buffer()).view(dtype)
            elif not q.ScaleIsNone():
                scales = q.ScaleAsNumpy()
            else:
                continue
            zero = scales == 0
            if zero.any():
                codes = writable_buffer(m, data, tensor.Buffer())
                if tensor.Type() == schema.TensorType.INT4:  # two codes a byte, low nibble first
                    codes = np.stack([codes & 15, codes >> 4], -1)
                if codes.reshape(len(scales), -1)[zero].any():
                    raise ValueError(f"tensor {tensor.Name().decode()}: a block with scale 0 holds nonzero codes")
                scales[zero] = 1.0
    return bytes(data)


def writable_buffer(m, data: bytearray, index: int) -> np.ndarray:
    """Buffer `index` of the model in `data` as a writable uint8 view: inline, or after the flatbuffer."""
    buffer = m.Buffers(index)
    if not buffer.DataIsNone() and buffer.DataLength():
        return buffer.DataAsNumpy()
    return np.frombuffer(data, np.uint8, count=buffer.Size(), offset=buffer.Offset())
