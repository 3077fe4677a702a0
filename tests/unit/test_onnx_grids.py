"""ONNX's grids and file layout without an export: onnxruntime's own int4 and int8 grids, the offset
grid keeping a Q4_1 source, and weights beside a model past the protobuf limit."""

from __future__ import annotations

import numpy as np
import torch

from edgepack.quant import QuantSpec


def test_rounding_is_onnxruntimes_own_grid():
    """The eager reference's fake quantization against onnxruntime's two quantizers (MLAS in C++
    for MatMul weights, numpy for Gather tables) on the same random matrices: bit for bit."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    from edgepack.exporters.onnx.lower import gather_rounding, rounding
    from edgepack.exporters.weights import fake_quantize

    spec = QuantSpec.from_options("int4", 32)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    weight[0, :32] = torch.linspace(-1, 1, 32)  # a tie between +max and -max: the negative one wins
    # exact halves (scale -0.125): MatMul rounds them up, Gather to even
    weight[1, :32] = 0.0
    weight[1, :5] = torch.tensor([1.0, 0.1875, -0.1875, 0.0625, -0.0625])  # / scale: -8, -1.5, 1.5, -0.5, 0.5
    ours = fake_quantize(weight, spec.linear, rounding(4)).numpy()
    ours_gather = fake_quantize(weight, spec.linear, gather_rounding(4)).numpy()
    assert (ours[1, 1:5] / -0.125).tolist() == [-1, 2, 0, 1] and (ours_gather[1, 1:5] / -0.125).tolist() == [-2, 2, 0, 0]

    k, n = 128, 48  # MatMul weight is [K, N] = W^T; quantized per column in blocks along K
    packed = np.zeros((n, k // 32, 16), np.uint8)
    scales = np.zeros((n, k // 32), np.float32)
    quantize_matmul_4bits(packed, np.ascontiguousarray(weight.numpy().T), scales, np.zeros((n, 4), np.uint8), 32, n, k, True)
    q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, k).astype(np.float32) - 8
    matmul = (q.reshape(n, 4, 32) * scales[..., None]).reshape(n, k)
    np.testing.assert_array_equal(ours, matmul)

    data, gather_scales, _ = DefaultWeightOnlyQuantizer.quantize_ndarray(weight.numpy(), 1, 32, True)
    low, high = (data & 0xF).astype(np.int8), (data >> 4).astype(np.int8)
    signed = np.stack([low, high], axis=-1).reshape(n, k)
    signed = np.where(signed > 7, signed - 16, signed).astype(np.float32)
    gather = (signed.reshape(n, 4, 32) * gather_scales.reshape(n, 4, 1)).reshape(n, k)
    np.testing.assert_array_equal(ours_gather, gather)


def test_int8_per_channel_is_the_references_grid_and_mlas_8_bit_one():
    """int8 per channel (mixed precision's overrides): edgepack writes the codes (onnxruntime's
    quantizer has no per-channel int8; MatMulNBits blocks stop at 256), exactly the reference's
    fake quantization, for linears and tables alike. That grid is MLAS's 8-bit one: where a row
    fits one MatMulNBits block (K = 128), quantize_matmul_8bits gives the same codes and scales,
    ties (+-1.5 steps) rounded up."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    from edgepack.exporters.mixed_precision import INT8
    from edgepack.exporters.onnx.lower import _int8_rows, gather_rounding, rounding
    from edgepack.exporters.weights import fake_quantize

    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    weight[1] = 0.0
    weight[1, :3] = torch.tensor([1.0, 0.01171875, -0.01171875])  # / scale -1/128: -128, -1.5, 1.5
    weight[2] = 0.0  # an all-zero row: codes 0
    q, scales = _int8_rows(weight.numpy())
    reference = fake_quantize(weight, INT8, rounding(8)).numpy()
    assert gather_rounding(8) == rounding(8) and q.dtype == np.int8 and scales.shape == (48,)
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
    stored_q, stored_scale, offset_codes, offset_scales = offset_blocks(weight.numpy(), 32)
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

