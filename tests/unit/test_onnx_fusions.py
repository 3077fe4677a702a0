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
    assert counts == {"reshape_pairs_folded": 2, "identity_reshapes_dropped": 1, "skip_rms_norms_fused": 1}
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
    assert counts == {"reshape_pairs_folded": 0, "identity_reshapes_dropped": 0, "skip_rms_norms_fused": 0}
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in model.graph.node]
