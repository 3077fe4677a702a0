"""The ONNX backend's rewrites into onnxruntime's fused shapes (exporters/onnx/fusions.py) on a
small hand-built graph, run by ONNX Runtime before and after: the same outputs, fewer nodes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgepack.exporters.onnx.fusions import fuse_for_onnxruntime

HIDDEN = 8


def _rms_norm(x: str, gamma: str, tag: str) -> list:
    """RMSNorm as torch.onnx writes transformers' LlamaRMSNorm: x * 1/sqrt(mean(x^2) + eps) * gamma."""
    return [
        helper.make_node("Pow", [x, "two"], [f"{tag}_sq"]),
        helper.make_node("ReduceMean", [f"{tag}_sq", "last_axis"], [f"{tag}_ms"], keepdims=1, noop_with_empty_axes=0),
        helper.make_node("Add", [f"{tag}_ms", "eps"], [f"{tag}_ms_eps"]),
        helper.make_node("Sqrt", [f"{tag}_ms_eps"], [f"{tag}_rms"]),
        helper.make_node("Reciprocal", [f"{tag}_rms"], [f"{tag}_inv"]),
        helper.make_node("Mul", [x, f"{tag}_inv"], [f"{tag}_normed"]),
        helper.make_node("Mul", [gamma, f"{tag}_normed"], [f"{tag}_out"]),
    ]


def _model() -> onnx.ModelProto:
    """a, b [1, S, 8]: h = a + b, n = rms(h) split into heads and joined again (two Reshapes),
    out = h + n (the sum is used after the norm, as a residual stream is); first = rms(a), a norm
    that reads no Add, which must stay as it is."""
    rows = ["one", "S", HIDDEN]
    nodes = [helper.make_node("Add", ["a", "b"], ["h"]), *_rms_norm("h", "gamma", "n"),
             helper.make_node("Reshape", ["n_out", "heads"], ["n_heads"]),
             helper.make_node("Reshape", ["n_heads", "rows"], ["n_rows"]),
             helper.make_node("Reshape", ["n_rows", "rows"], ["n_same"]),
             helper.make_node("Add", ["h", "n_same"], ["out"]),
             *_rms_norm("a", "gamma", "first")]
    constants = {"two": np.array(2.0, np.float32), "last_axis": np.array([-1], np.int64),
                 "eps": np.array(1e-5, np.float32), "gamma": np.linspace(0.5, 1.5, HIDDEN, dtype=np.float32),
                 "heads": np.array([1, -1, 2, 4], np.int64), "rows": np.array([1, -1, HIDDEN], np.int64)}
    shaped = {"h": rows, "n_out": rows, "n_heads": [1, "S", 2, 4], "n_rows": rows, "n_same": rows,
              **{f"{t}_{part}": rows for t in ("n", "first") for part in ("sq", "normed", "out")},
              **{f"{t}_{part}": [1, "S", 1] for t in ("n", "first") for part in ("ms", "ms_eps", "rms", "inv")}}
    value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1 if d == "one" else d for d in shape])  # noqa: E731
    graph = helper.make_graph(nodes, "residual_norm", [value("a", rows), value("b", rows)],
                              [value("out", rows), value("first_out", rows)],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()],
                              value_info=[value(k, v) for k, v in shaped.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_residual_norms_and_reshapes_fuse_with_the_same_outputs():
    model = _model()
    fused, counts = fuse_for_onnxruntime(model)
    onnx.checker.check_model(fused, full_check=True)
    assert counts == {"reshape_pairs_folded": 2, "identity_reshapes_dropped": 1, "attention_inputs_packed": 0,
                      "skip_rms_norms_fused": 1}
    ops = [n.op_type for n in fused.graph.node]
    # the Add-fed norm is one node; the norm of the input keeps its 7 plain ops; no Reshape is left
    assert ops.count("SkipSimplifiedLayerNormalization") == 1 and ops.count("Pow") == 1 and "Reshape" not in ops
    assert len(ops) == 1 + 7 + 1  # the fused norm, the plain one, the residual Add
    rng = np.random.default_rng(0)
    for length in (1, 5):
        feed = {name: rng.standard_normal((1, length, HIDDEN)).astype(np.float32) * 3 for name in ("a", "b")}
        for before, after in zip(_run(model, feed), _run(fused, feed)):
            np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_a_graph_with_nothing_to_fuse_is_returned_as_it_was():
    model = _model()
    nodes = {n.output[0]: n for n in model.graph.node}
    keep = [nodes["h"], *(n for name, n in nodes.items() if name.startswith("first")), nodes["out"]]
    keep[-1].input[1] = "first_out"  # out = h + rms(a)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    fused, counts = fuse_for_onnxruntime(model)
    assert counts == {"reshape_pairs_folded": 0, "identity_reshapes_dropped": 0, "attention_inputs_packed": 0,
                      "skip_rms_norms_fused": 0}
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in model.graph.node]


def _attention_model(widths: list[int]) -> onnx.ModelProto:
    """qkv [1, t, 96] split into q, k, v (`widths`) for a GroupQueryAttention of 4 query and 1 KV
    heads of 16 features, rotary on, as the ONNX export writes a decoder layer's attention."""
    heads, kv_heads, dim = 4, 1, 16
    f = TensorProto.FLOAT
    split = helper.make_node("Split", ["qkv", "widths"], ["q", "k", "v"], axis=-1)
    attention = helper.make_node(
        "GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", "seqlens", "total", "cos", "sin", "positions"],
        ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
        scale=dim ** -0.5, softcap=0.0, local_window_size=-1, do_rotary=1, rotary_interleaved=0)
    inputs = [helper.make_tensor_value_info("qkv", f, [1, "t", (heads + 2 * kv_heads) * dim]),
              helper.make_tensor_value_info("past_k", f, [1, kv_heads, "p", dim]),
              helper.make_tensor_value_info("past_v", f, [1, kv_heads, "p", dim]),
              helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("cos", f, ["r", dim // 2]), helper.make_tensor_value_info("sin", f, ["r", dim // 2]),
              helper.make_tensor_value_info("positions", TensorProto.INT64, [1, "t"])]
    graph = helper.make_graph([split, attention], "attention", inputs,
                              [helper.make_tensor_value_info(n, f, None) for n in attention.output],
                              [numpy_helper.from_array(np.array(widths, np.int64), "widths")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def test_attention_reads_the_packed_projection_with_the_same_outputs():
    model = _attention_model([64, 16, 16])
    packed, counts = fuse_for_onnxruntime(model)
    assert counts["attention_inputs_packed"] == 1
    [attention] = packed.graph.node  # the Split is gone
    assert list(attention.input[:3]) == ["qkv", "", ""]
    rng = np.random.default_rng(0)
    past, new = 5, 3
    angles = np.arange(past + new)[:, None] / 10 ** np.linspace(0, 3, 8)
    feed = {"qkv": rng.standard_normal((1, new, 96)).astype(np.float32),
            **{name: rng.standard_normal((1, 1, past, 16)).astype(np.float32) for name in ("past_k", "past_v")},
            "seqlens": np.array([past + new - 1], np.int32), "total": np.array(past + new, np.int32),
            "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
            "positions": np.arange(past, past + new)[None]}
    for before, after in zip(_run(model, feed), _run(packed, feed)):
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_attention_inputs_of_other_widths_stay_split():
    """Widths that are not heads·D, kv_heads·D, kv_heads·D (here 48 query features of 4 heads'
    64): not q, k and v of this attention, so the graph keeps its Split."""
    model = _attention_model([48, 24, 24])
    packed, counts = fuse_for_onnxruntime(model)
    assert counts["attention_inputs_packed"] == 0 and [n.op_type for n in packed.graph.node] == ["Split", "GroupQueryAttention"]


def test_a_norm_the_skip_rule_cannot_take_leaves_every_norm_plain():
    """An Add-fed norm on 2-D rows [S, 8]: the RMS rule matches it, the Skip rule (3-D inputs
    only) does not, so no lone SimplifiedLayerNormalization (an op onnx.checker rejects) is left:
    the graph keeps its plain norm and stays valid."""
    rows = ["S", HIDDEN]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, rows)  # noqa: E731
    nodes = [helper.make_node("Add", ["a", "b"], ["h"]), *_rms_norm("h", "gamma", "n")]
    constants = {"two": np.array(2.0, np.float32), "last_axis": np.array([-1], np.int64),
                 "eps": np.array(1e-5, np.float32), "gamma": np.linspace(0.5, 1.5, HIDDEN, dtype=np.float32)}
    graph = helper.make_graph(nodes, "rows_norm", [value("a"), value("b")], [value("n_out")],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()], value_info=[value("h")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    fused, counts = fuse_for_onnxruntime(model)
    onnx.checker.check_model(fused, full_check=True)
    assert counts["skip_rms_norms_fused"] == 0
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in model.graph.node]
