"""Which linear layers the TFLite converter rewrote before ai_edge_quantizer quantized them.

litert's converter sometimes folds a norm's affine into the linear layers the norm feeds (BERT's
post-LayerNorm into q/k/v and the MLP; not GPT-2's pre-LayerNorm nor Llama's RMSNorm, measured
2026-11-23 with litert-torch 0.10), so the stored int4 weights are quant(W·γ), not quant(W)·γ.
Rather than guess the converter's rules, the reference asks the artifact: the stored weights are
dequantized (exactly, in float32) and a candidate layer counts as folded when its folded
quantization is among them."""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch


def _dequantized_fc_weights(model: bytes) -> set[str]:
    """Digests of every quantized FULLY_CONNECTED weight in every subgraph, dequantized to float32."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(model, 0)
    digests = set()
    for graph in m.subgraphs:
        for op in graph.operators:
            code = m.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) != schema.BuiltinOperator.FULLY_CONNECTED:
                continue
            weight = graph.tensors[op.inputs[1]]
            values = _dequantize(m, graph, weight, schema)
            if values is not None:
                digests.add(_digest(values))
    return digests


def _dequantize(m, graph, tensor, schema) -> np.ndarray | None:
    q, data = tensor.quantization, m.buffers[tensor.buffer].data
    if q is None or data is None or len(data) == 0:  # not a stored constant (e.g. an activation)
        return None
    rows, raw = int(tensor.shape[0]), np.frombuffer(bytes(data), np.uint8)
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
        scales = np.frombuffer(bytes(m.buffers[scales_tensor.buffer].data), dtype).astype(np.float32).reshape(rows, -1)
        return (values.reshape(rows, scales.shape[1], -1) * scales[..., None]).reshape(rows, -1)
    if q.scale is not None:
        return values * np.asarray(q.scale, np.float32).reshape(-1, 1)
    return None


def _digest(values: np.ndarray) -> str:
    """Of the float32 values, with -0.0 made 0.0 (a rounded negative times a scale)."""
    return hashlib.sha256(np.ascontiguousarray(values + np.float32(0.0), np.float32).tobytes()).hexdigest()


def folded_layers(model: bytes, candidates: dict, weights: dict[str, torch.Tensor],
                  quantize: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """The subset of `candidates` (layer name -> NormAffine) whose stored weight is the folded
    quantization quantize(W·γ)."""
    stored = _dequantized_fc_weights(model)
    return {name: affine for name, affine in candidates.items()
            if _digest(quantize(weights[name] * affine.scale).numpy()) in stored}
