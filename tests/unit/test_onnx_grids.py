"""ONNX's grids and file layout without an export: the symmetric int4 grid against onnxruntime's
own quantizer, the int8 grid, the offset grid keeping a Q4_1 source, and weights
beside a model past the protobuf limit."""

from __future__ import annotations

import numpy as np
import torch

from edgepack.quant import QuantSpec


def test_symmetric_grid_is_onnxruntimes_own_with_fp16_scales_and_runs_as_stored(tmp_path):
    """--onnx-grid symmetric: the reference's grid with float32 scales is onnxruntime's MLAS
    quantizer bit for bit (ties rounded up); stored, the scales are MLAS's rounded to fp16 and the
    codes follow them (a weight changes code only where it sat within fp16's rounding of a tie).
    ONNX Runtime's MatMulNBits on the stored codes and scales computes what the reference
    multiplies, and an all-zero block is stored as codes 8 (zero) with a nonzero scale."""
    import dataclasses

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    from edgepack.exporters.onnx.lower import rounding, symmetric_blocks
    from edgepack.exporters.onnx.runtime import session
    from edgepack.exporters.weights import fake_quantize

    wq = QuantSpec.from_options("int4", 32).linear
    n, k = 48, 128
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    weight[0, :32] = torch.linspace(-1, 1, 32)  # a tie between +max and -max: the negative one wins
    weight[1, :32] = 0.0
    weight[1, :5] = torch.tensor([1.0, 0.1875, -0.1875, 0.0625, -0.0625])  # / scale -0.125: -8, -1.5, 1.5, -0.5, 0.5
    weight[2, :32] = 0.0
    packed = np.zeros((n, k // 32, 16), np.uint8)
    scales = np.zeros((n, k // 32), np.float32)
    quantize_matmul_4bits(packed, np.ascontiguousarray(weight.numpy().T), scales, np.zeros((n, 4), np.uint8), 32, n, k, True)
    mlas_codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, k)
    mlas = ((mlas_codes.astype(np.float32) - 8).reshape(n, 4, 32) * scales[..., None]).reshape(n, k)
    float32_scales = fake_quantize(weight, wq, dataclasses.replace(rounding(4), scale_dtype=None)).numpy()
    np.testing.assert_array_equal(float32_scales, mlas)
    assert (float32_scales[1, 1:5] / -0.125).tolist() == [-1, 2, 0, 1]

    codes, fp16_scales, offsets = symmetric_blocks(weight.numpy(), 32)
    assert offsets is None and codes.dtype == np.uint8 and fp16_scales.dtype == np.float16
    expected_scales = scales.astype(np.float16)
    expected_scales[2, 0] = 1.0  # the all-zero block: MLAS's scale 0, the reference's 1 (codes 8 either way)
    np.testing.assert_array_equal(fp16_scales, expected_scales)
    assert (codes != mlas_codes).mean() < 1e-3 and (np.abs(codes.astype(int) - mlas_codes) <= 1).all()
    assert (codes[2, :32] == 8).all()
    reference = fake_quantize(weight, wq, rounding(4)).numpy()
    np.testing.assert_array_equal(((codes.astype(np.float32) - 8).reshape(n, 4, 32)
                                   * fp16_scales.astype(np.float32)[..., None]).reshape(n, k), reference)

    x = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    stored = [numpy_helper.from_array((codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, k // 32, 16), "w"),
              numpy_helper.from_array(fp16_scales.astype(np.float32), "s")]
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], stored)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    [y] = session(tmp_path / "m.onnx").run(None, {"x": x})
    np.testing.assert_allclose(y, x @ reference.T, rtol=1e-4, atol=1e-4)


def test_int8_per_channel_is_the_references_grid_and_mlas_8_bit_one():
    """int8 per channel (mixed precision's overrides): edgepack writes the codes (onnxruntime's
    quantizer has no per-channel int8; MatMulNBits blocks stop at 256), exactly the reference's
    fake quantization, for linears and tables alike. That grid is MLAS's 8-bit one: where a row
    fits one MatMulNBits block (K = 128), quantize_matmul_8bits gives the same codes and scales,
    ties (+-1.5 steps) rounded up."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    from edgepack.exporters.mixed_precision import INT8
    from edgepack.exporters.onnx.lower import _int8_rows, rounding
    from edgepack.exporters.weights import fake_quantize

    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    weight[1] = 0.0
    weight[1, :3] = torch.tensor([1.0, 0.01171875, -0.01171875])  # / scale -1/128: -128, -1.5, 1.5
    weight[2] = 0.0  # an all-zero row: codes 0
    q, scales = _int8_rows(weight.numpy())
    reference = fake_quantize(weight, INT8, rounding(8)).numpy()
    assert q.dtype == np.int8 and scales.shape == (48,)
    np.testing.assert_array_equal(q * scales[:, None], reference)
    assert q[1, :3].tolist() == [-128, -1, 2] and not q[2].any()

    n, k = weight.shape
    packed, mlas_scales = np.zeros((n, 1, k), np.uint8), np.zeros((n, 1), np.float32)
    quantize_matmul_8bits(packed, np.ascontiguousarray(weight.numpy().T), mlas_scales, np.zeros((n, 1), np.uint8), k, n, k, True)
    np.testing.assert_array_equal(packed.reshape(n, k).astype(np.int16) - 128, q)
    np.testing.assert_array_equal(mlas_scales[[0, 1, *range(3, n)], 0], scales[[0, 1, *range(3, n)]])


def test_offset_grid_keeps_a_q4_1_source():
    """A weight already on GGUF's Q4_1 grid (per block of 32: fp16 scale d and minimum m, codes
    0..15 with both ends used) comes back with its own codes and scales, and its values to within
    half a step of the stored offsets m + 8d on their int8 grid (a float32 scale per row): what the
    offset grid is for (a GGUF-sourced model survives it nearly unchanged; the symmetric grid
    re-rounds it)."""
    from edgepack.exporters.onnx.lower import offset_blocks, offset_parts, rounding
    from edgepack.exporters.weights import fake_quantize, quantize_min_max

    g = torch.Generator().manual_seed(0)
    rows, blocks = 64, 8
    codes = torch.randint(0, 16, (rows, blocks, 32), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(rows, blocks, 1, generator=g) * 0.02 + 0.001).half().float()
    m = (-torch.rand(rows, blocks, 1, generator=g) * 0.2).half().float()
    weight = (d * codes + m).reshape(rows, blocks * 32)
    q, scale, minimum = quantize_min_max(weight, 4, 32)
    assert torch.equal(q, codes.float()) and torch.allclose(scale, d, rtol=1e-6) and torch.equal(minimum, m)
    stored_q, stored_scale, (offset_codes, offset_scales) = offset_blocks(weight.numpy(), 32)
    assert np.array_equal(stored_q.reshape(rows, blocks, 32), codes.numpy())
    assert offset_codes.dtype == np.int8 and np.abs(offset_codes).max() == 127 and offset_scales.shape == (rows, 1)
    symmetric, offsets = offset_parts(weight, 32)
    back = symmetric + offsets.repeat_interleave(32, dim=1)
    err = (back - weight).abs()
    row_step = (m + 8 * d).abs().amax(dim=(1, 2)) / 127
    assert (err.amax(dim=1) <= row_step / 2 * (1 + 1e-5) + 1e-7).all(), err.max()
    err = err.max().item()
    resymmetric = (fake_quantize(weight, QuantSpec.from_options("int4", 32).linear, rounding(4)) - weight).abs().max().item()
    assert resymmetric > 20 * err, (resymmetric, err)


def test_a_model_past_the_protobuf_limit_gets_its_weights_beside_it(tmp_path, monkeypatch):
    """Above 2 GiB the weights go to model.onnx.data (tested with the threshold lowered): the pair
    runs on ONNX Runtime like the single file and serializes to the same bytes twice."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepack.exporters.onnx import graph as onnx_graph
    from edgepack.exporters.onnx.runtime import session

    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_THRESHOLD", 0)
    files = onnx_graph.serialize(model, "model.onnx")
    assert sorted(files) == ["model.onnx", "model.onnx.data"] and files == onnx_graph.serialize(model, "model.onnx")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    x = np.ones((1, 64), np.float32)
    [y] = session(tmp_path / "model.onnx").run(["y"], {"x": x})
    np.testing.assert_allclose(y, x @ weight, rtol=1e-5)
    assert len(files["model.onnx"]) < weight.nbytes <= len(files["model.onnx.data"])
    onnx.checker.check_model(str(tmp_path / "model.onnx"))

