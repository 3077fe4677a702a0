"""numpy semantics of the MIL ops edgepack's CoreML programs contain, one function per op type.

Each function takes the op's inputs as keyword arguments (numpy arrays or Python scalars, already
resolved) and returns its output(s). Floating inputs arrive as float32 even where the program
says fp16: the evaluator (coreml_mil.py) upcasts them and rounds every result to the dtype the
program declares for it, so storage precision is that of the device while the arithmetic inside
one op is float32 (the Apple GPU and Neural Engine accumulate in at least fp16; their summation
order is not modelled). Semantics follow coremltools' op definitions under
converters/mil/mil/ops/defs (iOS15..iOS18).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from edgepack.errors import EdgepackError

# MIL dtype names (cast's `dtype` argument) -> numpy
MIL_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int8": np.int8, "uint8": np.uint8, "int16": np.int16,
              "uint16": np.uint16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


class UnsupportedMilOp(EdgepackError):
    """The program contains an op type the evaluator has no numpy semantics for."""


class StateSlot:
    """A CoreML state: read_state reads it, coreml_update_state writes it; it lives across calls."""

    def __init__(self, value: np.ndarray):
        self.value = value


def _axis_list(axes, rank: int) -> tuple[int, ...] | None:
    return None if axes is None else tuple(int(a) % rank for a in np.atleast_1d(axes))


def _index(x: np.ndarray, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None) -> tuple:
    """The numpy index of slice_by_index / slice_update. A squeezed axis takes the single index begin."""
    index = []
    for i, dim in enumerate(x.shape):
        if squeeze_mask is not None and squeeze_mask[i]:
            index.append(int(begin[i]) % dim)
            continue
        step = 1 if stride is None else int(stride[i])
        start = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        stop = None if end_mask is not None and end_mask[i] else int(end[i])
        index.append(slice(start, stop, step))
    return tuple(index)


def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return x[_index(x, begin, end, stride, begin_mask, end_mask, squeeze_mask)]


def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(x, copy=True)
    index = _index(x, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out[index] = np.reshape(update, out[index].shape)
    return out


def reshape(x, shape):
    """iOS17 rule: a 0 copies the input dim at the same position counted from the right (1 if none)."""
    shape = [int(s) for s in np.atleast_1d(shape)]
    for i, s in enumerate(shape):
        if s == 0:
            j = x.ndim - (len(shape) - i)
            shape[i] = x.shape[j] if j >= 0 else 1
    return np.reshape(x, shape)


def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if batch_dims:
        raise UnsupportedMilOp(f"gather with batch_dims={batch_dims} is not implemented")
    return np.take(x, np.asarray(indices).astype(np.int64), axis=int(axis))


def gather_nd(x, indices, batch_dims=0, validate_indices=False):
    """indices [..., K] index the first K dims of x."""
    if batch_dims:
        raise UnsupportedMilOp(f"gather_nd with batch_dims={batch_dims} is not implemented")
    indices = np.asarray(indices).astype(np.int64)
    return x[tuple(np.moveaxis(indices, -1, 0))]


def concat(values, axis, interleave=False):
    if interleave:
        raise UnsupportedMilOp("concat with interleave=True is not implemented")
    return np.concatenate([np.atleast_1d(v) for v in values], axis=int(axis))


def split(x, axis, num_splits=None, split_sizes=None):
    """Equal parts (num_splits) or the given sizes along axis; one output per part."""
    axis = int(axis) % x.ndim
    sizes = [int(s) for s in np.atleast_1d(split_sizes)] if split_sizes is not None else [x.shape[axis] // int(num_splits)] * int(num_splits)
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def matmul(x, y, transpose_x=False, transpose_y=False):
    x = np.swapaxes(x, -1, -2) if transpose_x else x
    y = np.swapaxes(y, -1, -2) if transpose_y else y
    return np.matmul(x, y)


def linear(x, weight, bias=None):
    out = np.matmul(x, weight.T)
    return out if bias is None else out + bias


def softmax(x, axis=-1):
    shifted = x - np.max(x, axis=int(axis), keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=int(axis), keepdims=True)


def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    axes = _axis_list(axes, x.ndim)
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + epsilon)
    return out * (1 if gamma is None else gamma) + (0 if beta is None else beta)


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x, mode="EXACT"):
    if mode == "EXACT":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)).astype(np.float64))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    raise UnsupportedMilOp(f"gelu mode {mode!r} is not implemented")


def _reduce(fn) -> Callable:
    def reduce(x, axes=None, keep_dims=False):
        return fn(x, axis=_axis_list(axes, np.ndim(x)), keepdims=bool(keep_dims))
    return reduce


def blockwise_shift_scale(data, scale, offset=None):
    """constexpr_blockwise_shift_scale (iOS18): (data - offset) * scale, each scale entry covering
    a block of data (data.shape[i] / scale.shape[i] elements along axis i)."""
    def spread(p):
        for axis, (d, s) in enumerate(zip(data.shape, p.shape)):
            p = np.repeat(p, d // s, axis=axis) if d != s else p
        return p
    values = data.astype(np.float32)
    if offset is not None:
        values = values - spread(np.asarray(offset, dtype=np.float32))
    return values * spread(np.asarray(scale, dtype=np.float32))


def lut_to_dense(indices, lut, vector_axis=None):
    """constexpr_lut_to_dense (iOS18): lut [blocks_0 .. blocks_{r-1}, 2^nbits, 1]; every output
    element looks up its own block's palette with its index (vector_size 1 only)."""
    if lut.shape[-1] != 1:
        raise UnsupportedMilOp(f"constexpr_lut_to_dense with vector size {lut.shape[-1]} is not implemented")
    indices = np.asarray(indices).astype(np.int64)
    block = [d // b for d, b in zip(indices.shape, lut.shape[:-2])]
    grid = np.meshgrid(*[np.arange(d) // s for d, s in zip(indices.shape, block)], indexing="ij")
    return lut[(*grid, indices, 0)]


def affine_dequantize(quantized_data, zero_point, scale, axis):
    """constexpr_affine_dequantize (iOS16, int8 per-channel): (q - zero_point) * scale along axis."""
    shape = [1] * quantized_data.ndim
    shape[int(axis)] = -1
    zp = np.reshape(np.asarray(zero_point, dtype=np.float32), shape) if np.ndim(zero_point) else np.float32(zero_point)
    sc = np.reshape(np.asarray(scale, dtype=np.float32), shape) if np.ndim(scale) else np.float32(scale)
    return (quantized_data.astype(np.float32) - zp) * sc


def update_state(state: StateSlot, value):
    state.value = value
    return value


OPS: dict[str, Callable] = {
    # elementwise
    "add": lambda x, y: np.add(x, y),
    "sub": lambda x, y: np.subtract(x, y),
    "mul": lambda x, y: np.multiply(x, y),
    "real_div": lambda x, y: np.true_divide(x, y),
    "pow": lambda x, y: np.power(x, y),
    "minimum": lambda x, y: np.minimum(x, y),
    "maximum": lambda x, y: np.maximum(x, y),
    "clip": lambda x, alpha, beta: np.minimum(np.maximum(x, alpha), beta),
    "equal": lambda x, y: np.equal(x, y),
    "less_equal": lambda x, y: np.less_equal(x, y),
    "greater": lambda x, y: np.greater(x, y),
    "greater_equal": lambda x, y: np.greater_equal(x, y),
    "logical_and": lambda x, y: np.logical_and(x, y),
    "select": lambda cond, a, b: np.where(cond, a, b),
    "abs": lambda x: np.abs(x),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(x + epsilon),
    "sin": lambda x: np.sin(x),
    "cos": lambda x: np.cos(x),
    "tanh": lambda x: np.tanh(x),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": gelu,
    "cast": lambda x, dtype: np.asarray(x).astype(MIL_DTYPES[dtype]),
    # reductions and normalization
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "softmax": softmax,
    "layer_norm": layer_norm,
    # linear algebra
    "linear": linear,
    "matmul": matmul,
    # shapes and indexing
    "shape": lambda x: np.array(np.shape(x), dtype=np.int32),
    "reshape": reshape,
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in np.atleast_1d(axes))),
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "tile": lambda x, reps: np.tile(x, [int(r) for r in np.atleast_1d(reps)]),
    "concat": concat,
    "split": split,
    "stack": lambda values, axis: np.stack(values, axis=int(axis)),
    "slice_by_index": slice_by_index,
    "gather": gather,
    "gather_nd": gather_nd,
    "gather_along_axis": lambda x, indices, axis=0, validate_indices=False: np.take_along_axis(
        x, np.asarray(indices).astype(np.int64), axis=int(axis)),
    "range_1d": lambda end, start, step: np.arange(start, end, step),
    # states (KV cache)
    "read_state": lambda input: input.value,
    "coreml_update_state": update_state,
    "slice_update": slice_update,
    # compressed weights (evaluated once, at load)
    "constexpr_blockwise_shift_scale": blockwise_shift_scale,
    "constexpr_lut_to_dense": lut_to_dense,
    "constexpr_affine_dequantize": affine_dequantize,
}
