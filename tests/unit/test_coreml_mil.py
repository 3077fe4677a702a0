"""CoreML pieces checked without converting a model: the numpy MIL evaluator that runs an .mlpackage
on Linux (op by op against torch, states, decompression), the options' checks, and the fp16 RMSNorm
rescaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepack.errors import InputError
from edgepack.exporters.coreml.mil import MilFunction
from edgepack.exporters.coreml.mil_ops import OPS, UnsupportedMilOp


@pytest.mark.parametrize("values, word", [({"ios_target": 16}, "ios-target"), ({"precision": "bf16"}, "precision"),
                                          ({"compression": "int3"}, "compression"),
                                          ({"grid": "asymmetric"}, "grid")])
def test_bad_coreml_options_are_input_errors(values, word):
    from edgepack.exporters.coreml.lower import Options

    with pytest.raises(InputError, match=word):
        Options(**values)


def test_fp16_rms_norm_is_rescaled_so_large_activations_do_not_overflow():
    """RMSNorm squares its input, and x² overflows fp16 once |x| > 256: the real SmolLM2-135M's
    residual stream reaches ~620, so its plain fp16 norms return 0 (rsqrt(inf)) and every logit
    was 0. The fp16 export rewrites each norm as rsqrt(mean((x/m)²) + eps/m²) / m, m = max(max|x|, 1):
    the fp16 program then answers like torch for spiky, ordinary, tiny and all-zero rows alike."""
    import coremltools as ct
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from edgepack.exporters.coreml.lower import _fp16_safe_rms_norms

    norm = LlamaRMSNorm(8, eps=1e-5).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.tensor([[[620.0, -3, 1, 0.5, -2, 4, 0.25, 1],     # one huge value: x² = 384400 > 65504
                       [3, -1.5, 2, 0.5, -2, 1, 0.75, -1],       # ordinary
                       [1e-3, -2e-3, 5e-4, 0, 1e-3, 0, -1e-3, 2e-3],  # max|x| < 1: not rescaled
                       [0, 0, 0, 0, 0, 0, 0, 0]]])               # eps alone
    expected = norm(x).detach().numpy()

    def fp16_output(rewrite: bool) -> np.ndarray:
        program = torch.export.export(norm, (x,)).run_decompositions({})
        if rewrite:
            assert _fp16_safe_rms_norms(program) == 1
            np.testing.assert_allclose(program.module()(x).detach().numpy(), expected, rtol=1e-6, atol=1e-6)
        mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                             compute_precision=ct.precision.FLOAT16, skip_model_load=True)
        function = MilFunction(mlmodel._mil_program.functions["main"])
        [out] = function({function.input_names[0]: x.numpy()})
        return np.asarray(out, dtype=np.float32)

    with np.errstate(over="ignore"):
        plain = fp16_output(rewrite=False)
    assert not plain[0, 0].any()  # the overflow: the spiky row normalized to zeros
    rescaled = fp16_output(rewrite=True)
    assert np.isfinite(rescaled).all()
    np.testing.assert_allclose(rescaled, expected, rtol=2e-3, atol=2e-3)


def _run(prog, **inputs):
    return MilFunction(prog.functions["main"])(inputs)


def _program(build, *specs):  # two inputs, named x and y
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    (x, x_type), (y, y_type) = specs

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=x_type), mb.TensorSpec(shape=y.shape, dtype=y_type)],
                opset_version=ct.target.iOS18)
    def prog(x, y):
        return build(mb, x, y)
    return prog


RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3, 4)).astype(np.float32)
Y = RNG.standard_normal((2, 3, 4)).astype(np.float32)
W = RNG.standard_normal((5, 4)).astype(np.float32)
B = RNG.standard_normal(5).astype(np.float32)
T = torch.from_numpy


# op type -> (build(mb, x, y), reference(x, y) in torch): x, y are X and Y above, both fp32
OP_CASES = {
    "add": (lambda mb, x, y: mb.add(x=x, y=y), lambda x, y: x + y),
    "sub": (lambda mb, x, y: mb.sub(x=x, y=y), lambda x, y: x - y),
    "mul": (lambda mb, x, y: mb.mul(x=x, y=y), lambda x, y: x * y),
    "real_div": (lambda mb, x, y: mb.real_div(x=x, y=y), lambda x, y: x / y),
    "pow": (lambda mb, x, y: mb.pow(x=x, y=2.0), lambda x, y: x ** 2),
    "minimum": (lambda mb, x, y: mb.minimum(x=x, y=y), torch.minimum),
    "maximum": (lambda mb, x, y: mb.maximum(x=x, y=y), torch.maximum),
    "abs": (lambda mb, x, y: mb.abs(x=x), lambda x, y: x.abs()),
    # two-sided, and one-sided as mean pooling's clamp(min=1) of the token count lowers
    "clip": (lambda mb, x, y: mb.add(x=mb.clip(x=x, alpha=-0.5, beta=0.5), y=mb.clip(x=y, alpha=0.25, beta=np.finfo(np.float32).max)),
             lambda x, y: x.clamp(-0.5, 0.5) + y.clamp(min=0.25)),
    "equal": (lambda mb, x, y: mb.cast(x=mb.equal(x=x, y=x), dtype="fp32"), lambda x, y: (x == x).float()),
    "less_equal": (lambda mb, x, y: mb.cast(x=mb.less_equal(x=x, y=y), dtype="fp32"), lambda x, y: (x <= y).float()),
    "greater": (lambda mb, x, y: mb.cast(x=mb.greater(x=x, y=y), dtype="fp32"), lambda x, y: (x > y).float()),
    "greater_equal": (lambda mb, x, y: mb.cast(x=mb.greater_equal(x=x, y=y), dtype="fp32"), lambda x, y: (x >= y).float()),
    "logical_and": (lambda mb, x, y: mb.cast(x=mb.logical_and(x=mb.greater_equal(x=x, y=0.0), y=mb.greater_equal(x=y, y=0.0)), dtype="fp32"),
                    lambda x, y: ((x >= 0) & (y >= 0)).float()),
    "select": (lambda mb, x, y: mb.select(cond=mb.less_equal(x=x, y=y), a=x, b=y), lambda x, y: torch.where(x <= y, x, y)),
    "rsqrt": (lambda mb, x, y: mb.rsqrt(x=mb.mul(x=x, y=x), epsilon=1e-6), lambda x, y: torch.rsqrt(x * x + 1e-6)),
    "sin": (lambda mb, x, y: mb.sin(x=x), lambda x, y: torch.sin(x)),
    "cos": (lambda mb, x, y: mb.cos(x=x), lambda x, y: torch.cos(x)),
    "tanh": (lambda mb, x, y: mb.tanh(x=x), lambda x, y: torch.tanh(x)),  # Gemma's logit soft-capping
    "silu": (lambda mb, x, y: mb.silu(x=x), lambda x, y: torch.nn.functional.silu(x)),
    "gelu": (lambda mb, x, y: mb.gelu(x=x), lambda x, y: torch.nn.functional.gelu(x)),
    "cast": (lambda mb, x, y: mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32"), lambda x, y: x.half().float()),
    "reduce_mean": (lambda mb, x, y: mb.reduce_mean(x=x, axes=[-1], keep_dims=True), lambda x, y: x.mean(-1, keepdim=True)),
    # keep_dims defaults to False; with no axes every axis is reduced (a scalar)
    "reduce_sum": (lambda mb, x, y: mb.add(x=mb.reduce_sum(x=x, axes=[1]), y=mb.reduce_sum(x=y)), lambda x, y: x.sum(1) + y.sum()),
    # the fp16 RMSNorm rewrite's max|x| over the normalized axes
    "reduce_max": (lambda mb, x, y: mb.reduce_max(x=x, axes=[-1], keep_dims=True), lambda x, y: x.amax(-1, keepdim=True)),
    "softmax": (lambda mb, x, y: mb.softmax(x=x, axis=-1), lambda x, y: x.softmax(-1)),
    "layer_norm": (lambda mb, x, y: mb.layer_norm(x=x, axes=[-1], gamma=Y[0, 0], beta=Y[1, 1], epsilon=1e-5),
                   lambda x, y: torch.nn.functional.layer_norm(x, (4,), y[0, 0], y[1, 1], 1e-5)),
    "linear": (lambda mb, x, y: mb.linear(x=x, weight=W, bias=B), lambda x, y: x @ T(W).T + T(B)),
    "matmul": (lambda mb, x, y: mb.matmul(x=x, y=y, transpose_y=True), lambda x, y: x @ y.transpose(-1, -2)),
    "shape": (lambda mb, x, y: mb.cast(x=mb.shape(x=x), dtype="fp32"), lambda x, y: torch.tensor(x.shape, dtype=torch.float32)),
    # iOS17+ rule: a 0 copies the input dim at the same position counted from the right
    "reshape": (lambda mb, x, y: mb.reshape(x=x, shape=[0, -1]), lambda x, y: x.reshape(x.shape[1], -1)),
    "expand_dims": (lambda mb, x, y: mb.expand_dims(x=x, axes=[1]), lambda x, y: x.unsqueeze(1)),
    "transpose": (lambda mb, x, y: mb.transpose(x=x, perm=[2, 0, 1]), lambda x, y: x.permute(2, 0, 1)),
    "tile": (lambda mb, x, y: mb.tile(x=x, reps=[1, 2, 1]), lambda x, y: x.repeat(1, 2, 1)),
    "concat": (lambda mb, x, y: mb.concat(values=[x, y], axis=-1), lambda x, y: torch.cat([x, y], -1)),
    "stack": (lambda mb, x, y: mb.stack(values=[x, y], axis=1), lambda x, y: torch.stack([x, y], 1)),
    # GPT-2's fused qkv: equal parts (num_splits) and explicit sizes
    "split": (lambda mb, x, y: mb.add(x=mb.split(x=x, num_splits=2, axis=-1)[1], y=mb.split(x=y, split_sizes=[1, 3], axis=-1)[0]),
              lambda x, y: x[..., 2:] + y[..., :1]),
    "slice_by_index": (lambda mb, x, y: mb.slice_by_index(x=x, begin=[0, 1, 0], end=[2, 0, -1], end_mask=[True, True, False],
                                                          squeeze_mask=[False, False, False]),
                       lambda x, y: x[:, 1:, :-1]),
    "gather": (lambda mb, x, y: mb.gather(x=x, indices=np.array([2, 0], dtype=np.int32), axis=1), lambda x, y: x[:, [2, 0]]),
    "gather_nd": (lambda mb, x, y: mb.gather_nd(x=x, indices=np.array([[1, 2], [0, 0]], dtype=np.int32)), lambda x, y: x[[1, 0], [2, 0]]),
    "gather_along_axis": (lambda mb, x, y: mb.gather_along_axis(x=x, indices=np.zeros((2, 3, 1), dtype=np.int32) + 3, axis=2),
                          lambda x, y: x[..., 3:4]),
    "range_1d": (lambda mb, x, y: mb.add(x=x, y=mb.cast(x=mb.range_1d(start=0, end=4, step=1), dtype="fp32")),
                 lambda x, y: x + torch.arange(4.0)),
}


# Ops whose own test is below (states, slice_update, compressed weights)
SEPARATELY_TESTED = {"read_state", "coreml_update_state", "slice_update", "constexpr_blockwise_shift_scale",
                     "constexpr_lut_to_dense", "constexpr_affine_dequantize"}


def test_every_implemented_op_has_a_test():
    assert set(OP_CASES) | SEPARATELY_TESTED == set(OPS)


@pytest.mark.parametrize("op_type", sorted(OP_CASES))
def test_evaluator_op_matches_torch(op_type):
    from coremltools.converters.mil.mil import types

    build, reference = OP_CASES[op_type]
    prog = _program(build, (X, types.fp32), (Y, types.fp32))
    assert op_type in {op.op_type for op in prog.functions["main"].operations}
    [out] = _run(prog, x=X, y=Y)
    np.testing.assert_allclose(out, reference(T(X), T(Y)).numpy(), rtol=1e-5, atol=1e-5)


def test_evaluator_carries_states_and_slice_updates_between_calls():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.StateTensorSpec((1, 4, 2), dtype=types.fp16), mb.TensorSpec((1, 1, 2), dtype=types.fp16),
                             mb.TensorSpec((3,), dtype=types.int32)], opset_version=ct.target.iOS18)
    def prog(cache, x, begin):
        current = mb.read_state(input=cache)
        updated = mb.slice_update(x=current, update=x, begin=begin, end=mb.add(x=begin, y=[1, 1, 2]))
        return mb.coreml_update_state(state=cache, value=updated)

    function = MilFunction(prog.functions["main"])
    x0, x2 = np.array([[[1, 2]]], np.float16), np.array([[[3, 4]]], np.float16)
    function({"x": x0, "begin": np.array([0, 0, 0], np.int32)})
    [out] = function({"x": x2, "begin": np.array([0, 2, 0], np.int32)})
    expected = np.zeros((1, 4, 2), np.float16)
    expected[0, 0], expected[0, 2] = x0[0, 0], x2[0, 0]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(function.states["cache"].value, expected)


def test_evaluator_decompresses_int4_blocks_int8_channels_and_palettes_like_coremltools():
    """The constexpr ops against coremltools' own decompression (materialized values), int4
    blocks and int8 channels in one program as a mixed-precision plan stores them."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    data = RNG.integers(-7, 8, size=(4, 64)).astype(np.int8)
    scale = RNG.random((4, 2)).astype(np.float16)
    channels = RNG.integers(-127, 128, size=(3, 64)).astype(np.int8)
    channel_scales = RNG.random((3, 1)).astype(np.float16)
    indices = RNG.integers(0, 16, size=(4, 8)).astype(np.uint8)
    lut = RNG.standard_normal((2, 1, 16, 1)).astype(np.float16)
    quantized = RNG.integers(-127, 128, size=(3, 5)).astype(np.int8)
    channel_scale = RNG.random(3).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1,), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):
        blocks = mb.constexpr_blockwise_shift_scale(data=mb.const(val=data.astype(types.np_int4_dtype)), scale=scale)
        rows = mb.constexpr_blockwise_shift_scale(data=channels, scale=channel_scales)
        palette = mb.constexpr_lut_to_dense(indices=mb.const(val=indices.astype(types.np_uint4_dtype)), lut=lut)
        return blocks, rows, palette

    function = MilFunction(prog.functions["main"])
    decompressed = [op for op in prog.functions["main"].operations if op.op_type.startswith("constexpr_")]
    assert [types.builtin_to_string(op.data.dtype) for op in decompressed[:2]] == ["int4", "int8"]
    for op in decompressed:
        np.testing.assert_array_equal(function.constants[op.outputs[0].name], op.materialized_val_inference())
    from edgepack.exporters.coreml.mil_ops import affine_dequantize
    np.testing.assert_allclose(affine_dequantize(quantized, np.int8(0), channel_scale, 0),
                               quantized * channel_scale[:, None], rtol=1e-6)


def test_evaluator_names_every_unknown_op_type():
    from coremltools.converters.mil.mil import types

    prog = _program(lambda mb, x, y: mb.atan(x=mb.erf(x=x)), (X, types.fp32), (Y, types.fp32))
    with pytest.raises(UnsupportedMilOp, match="atan, erf"):
        MilFunction(prog.functions["main"])

