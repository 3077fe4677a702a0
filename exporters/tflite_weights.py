"""Which linear layers the TFLite converter rewrote before ai_edge_quantizer quantized them.

litert's converter sometimes folds a norm's affine into the linear layers the norm feeds (BERT's
post-LayerNorm into q/k/v and the MLP; not GPT-2's pre-LayerNorm nor Llama's RMSNorm, measured
2026-11-23 with litert-torch 0.10), so the stored int4 weights are quant(W·γ), not quant(W)·γ.
Rather than guess the converter's rules, the reference asks the artifact: the stored weights are
dequantized (exactly, in float32) and a candidate layer counts as folded when its folded
quantization is among them. Embedding tables are asked the same way whether they were quantized
at all."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def _dequantized_weights(model: bytes, operator: str) -> list[np.ndarray]:
    """Every quantized weight of `operator` ops (FULLY_CONNECTED: input 1, the weight;
    EMBEDDING_LOOKUP: input 1, the table) in every subgraph, dequantized to float32."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(model, 0)
    wanted = getattr(schema.BuiltinOperator, operator)
    found = []
    for graph in m.subgraphs:
        for op in graph.operators:
            code = m.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) != wanted:
                continue
            values = _dequantize(m, model, graph, graph.tensors[op.inputs[1]], schema)
            if values is not None:
                found.append(values)
    return found


def _buffer(m, model: bytes, index: int) -> bytes | None:
    """A buffer's bytes: inline, or (larger models) after the flatbuffer at offset/size."""
    buffer = m.buffers[index]
    if buffer.data is not None and len(buffer.data):
        return bytes(buffer.data)
    if buffer.offset > 1 and buffer.size:
        return model[buffer.offset:buffer.offset + buffer.size]
    return None


def _dequantize(m, model: bytes, graph, tensor, schema) -> np.ndarray | None:
    q, data = tensor.quantization, _buffer(m, model, tensor.buffer)
    if q is None or data is None:  # not a stored constant (e.g. an activation)
        return None
    rows, raw = int(tensor.shape[0]), np.frombuffer(data, np.uint8)
    if tensor.type == schema.TensorType.INT4:  # two values per byte, low nibble first
        values = np.stack([raw & 15, raw >> 4], -1).reshape(-1)[: rows * int(tensor.shape[1])].astype(np.int8)
        values = np.where(values > 7, values - 16, values)
    elif tensor.type == schema.TensorType.INT8:
        values = raw.view(np.int8)
    else:
        return None
    values = values.reshape(rows, -1).astype(np.float32)
    if q.details is not None and hasattr(q.details, "blockSize"):
        scales_tensor = graph.tensors[q.details.scales]
        dtype = np.float16 if scales_tensor.type == schema.TensorType.FLOAT16 else np.float32
        scales = np.frombuffer(_buffer(m, model, scales_tensor.buffer), dtype).astype(np.float32).reshape(rows, -1)
        return (values.reshape(rows, scales.shape[1], -1) * scales[..., None]).reshape(rows, -1)
    if q.scale is not None:
        return values * np.asarray(q.scale, np.float32).reshape(-1, 1)
    return None


def folded_layers(model: bytes, candidates: dict, weights: dict[str, torch.Tensor],
                  quantize: Callable[[torch.Tensor], torch.Tensor], multipliers: tuple[float, ...] = (1.0,)) -> dict:
    """The subset of `candidates` (layer name -> NormAffine) whose stored weight is the folded
    quantization quantize(W·γ·m) for one of `multipliers` (the converter also folds attention's
    1/sqrt(head_dim), split between q and k, into their weights, after γ: (W·γ)·m, which can round
    a bfloat16 scale differently from W·(γ·m)), returned with that multiplier.
    Compared to 1e-6: γ is measured (NormAffine) to ~1e-7."""
    stored = _by_shape(_dequantized_weights(model, "FULLY_CONNECTED"))
    folded = {}
    for name, affine in candidates.items():
        for m in multipliers:
            scaled = type(affine)(affine.scale, affine.shift, m)
            expected = quantize(weights[name] * scaled.scale * scaled.multiplier).numpy()
            if _stored(expected, stored):
                folded[name] = scaled
                break
    return folded


def quantized_tables(model: bytes, tables: dict[str, torch.Tensor],
                     quantize: Callable[[torch.Tensor], torch.Tensor]) -> set[str]:
    """The embedding tables (name -> weight) stored quantized as an EMBEDDING_LOOKUP table. The
    others never reached the quantizer: the converter folded their lookup into a float constant
    (BERT's position and token-type embeddings at a fixed sequence length)."""
    stored = _by_shape(_dequantized_weights(model, "EMBEDDING_LOOKUP"))
    return {name for name, weight in tables.items() if _stored(quantize(weight).numpy(), stored)}


def _by_shape(arrays: list[np.ndarray]) -> dict[tuple, list[np.ndarray]]:
    """Stored weights grouped by shape: only those of the same shape are worth comparing."""
    grouped: dict[tuple, list[np.ndarray]] = {}
    for values in arrays:
        grouped.setdefault(values.shape, []).append(values)
    return grouped


def _stored(expected: np.ndarray, stored: dict[tuple, list[np.ndarray]]) -> bool:
    return any(np.allclose(expected, v, rtol=0, atol=1e-6) for v in stored.get(expected.shape, []))
