"""graph.stack_shared_input_matmuls on a small hand-built graph, run by ONNX Runtime before and
after: MatMuls that read one input and are stored alike become one MatMul and a Split with the
same outputs; ones stored differently, or reading another input, are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgepack.exporters.onnx.graph import stack_shared_input_matmuls

HIDDEN = 8


def _model(rng) -> onnx.ModelProto:
    """x feeds q, k, v and g; y feeds o. Widths 8, 4, 4, 6, 8."""
    widths = {"q": 8, "k": 4, "v": 4, "g": 6, "o": 8}
    nodes = [helper.make_node("MatMul", ["y" if name == "o" else "x", f"w_{name}"], [name], name=name) for name in widths]
    weights = [numpy_helper.from_array(rng.standard_normal((HIDDEN, width)).astype(np.float32), f"w_{name}")
               for name, width in widths.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, HIDDEN]) for n in ("x", "y")],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, width]) for name, width in widths.items()], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(model: onnx.ModelProto, feed: dict) -> list:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_matmuls_of_one_input_stored_alike_become_one_with_the_same_outputs():
    rng = np.random.default_rng(0)
    model = _model(rng)
    feed = {n: rng.standard_normal((1, 3, HIDDEN)).astype(np.float32) for n in ("x", "y")}
    before = _run(model, feed)
    # q, k and v stored alike (int4), g another way (int8): only q, k, v stack; o reads y alone
    stacks = stack_shared_input_matmuls(model, {"q": "int4", "k": "int4", "v": "int4", "g": "int8", "o": "int4"})
    assert stacks == {"q": ["q", "k", "v"]}
    onnx.checker.check_model(model, full_check=True)
    ops = [(n.op_type, n.name) for n in model.graph.node]
    assert ops == [("MatMul", "q"), ("Split", "q_split"), ("MatMul", "g"), ("MatMul", "o")]
    stacked = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[model.graph.node[0].input[1]]
    assert stacked.shape == (HIDDEN, 16)
    assert {t.name for t in model.graph.initializer} >= {"w_g", "w_o"} and "w_k" not in {t.name for t in model.graph.initializer}
    after = _run(model, feed)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_nodes_outside_the_stored_set_are_not_stacked():
    model = _model(np.random.default_rng(1))
    assert stack_shared_input_matmuls(model, {"q": "int4", "o": "int4"}) == {}
    assert [n.op_type for n in model.graph.node] == ["MatMul"] * 5
