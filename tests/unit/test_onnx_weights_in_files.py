"""The ONNX lowering keeps a graph's float weights in files while it rewrites the graph (so a model
past protobuf's 2 GiB can be exported): the rewrites read and write them there and must write the
same artifact, byte for byte, as on a graph that holds its weights in the protobuf. Checked on a
small graph with every rewrite that reads or makes a float weight: a tied table (Gather and LM
head), two MatMuls on one input stacked into one, and the int4 storage of both grids."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgepack.exporters.onnx import graph as onnx_graph
from edgepack.exporters.onnx.lower import offset_blocks, offset_parts, rounding, symmetric_blocks
from edgepack.exporters.onnx.runtime import session
from edgepack.exporters.weights import fake_quantize
from edgepack.quant import WeightQuant

BLOCK = 32


def offset_weight(weight: torch.Tensor) -> torch.Tensor:
    symmetric, offsets = offset_parts(weight, BLOCK)
    return symmetric + offsets.repeat_interleave(BLOCK, dim=1)


# Each grid's blocks, and the [out, in] weight the artifact computes with.
GRIDS = {"offset": (offset_blocks, offset_weight),
         "symmetric": (symmetric_blocks, lambda w: fake_quantize(w, WeightQuant(bits=4, group_size=BLOCK), rounding(4)))}


def small_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((100, 64)).astype(np.float32)
    weights = {"table": table, "table_t": np.ascontiguousarray(table.T),
               "wq": rng.standard_normal((64, 64)).astype(np.float32), "wk": rng.standard_normal((64, 32)).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("Add", ["x", "e"], ["h"], name="residual"),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64]), helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, w]) for n, w in (("q", 64), ("k", 32), ("logits", 100))],
        [numpy_helper.from_array(a, n) for n, a in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def rewritten(model: onnx.ModelProto, folder, blocks) -> dict[str, bytes]:
    stacks = onnx_graph.stack_shared_input_matmuls(model, {"q_proj": "int4", "k_proj": "int4", "lm_head": "int4, the head"}, folder)
    assert stacks == {"q_proj": ["q_proj", "k_proj"]}
    onnx_graph.check_graph(model, folder)
    shared = onnx_graph.store_int4_blocks(model, {"q_proj", "lm_head", "embed"}, lambda w: blocks(w, BLOCK),
                                          BLOCK, 0, folder)  # fp32 compute: exact to compare
    assert shared == 1  # the Gather reads the LM head's table
    onnx_graph.check_graph(model, folder)
    return onnx_graph.serialize(model, "model.onnx", folder)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_weights_in_files_write_the_same_artifact_as_weights_in_the_protobuf(tmp_path, monkeypatch, grid):
    blocks, computed = GRIDS[grid]
    monkeypatch.setattr(onnx_graph, "EXTERNAL_MIN_BYTES", 0)  # every new float weight to a file, as a 1B model's are
    in_protobuf = rewritten(small_graph(), None, blocks)

    folder = tmp_path / "weights"
    folder.mkdir()
    onnx.save_model(small_graph(), folder / "exported.onnx", save_as_external_data=True, location="exported.onnx.data",
                    size_threshold=0)
    model = onnx.load(folder / "exported.onnx", load_external_data=False)
    assert onnx_graph.has_external_weights(model) and model.ByteSize() < 1000
    assert onnx_graph.graph_bytes(model) > (100 * 64 * 2 + 64 * 96) * 4  # the weights count, wherever they are
    in_files = rewritten(model, folder, blocks)
    assert len(list(folder.glob("*.bin"))) == 1  # the stacked q/k weight went to a file of its own

    assert in_files == in_protobuf and list(in_files) == ["model.onnx"]
    (tmp_path / "model.onnx").write_bytes(in_files["model.onnx"])
    x, ids = np.ones((1, 3, 64), np.float32), np.array([[0, 5, 99]], np.int64)
    q, logits = session(tmp_path / "model.onnx").run(["q", "logits"], {"x": x, "ids": ids})
    def stored(weight: np.ndarray) -> np.ndarray:  # [in, out] as the grid holds it
        return computed(torch.from_numpy(np.ascontiguousarray(weight.T))).numpy().T

    w = {t.name: numpy_helper.to_array(t) for t in small_graph().graph.initializer}
    h = x + stored(w["table_t"]).T[ids]
    np.testing.assert_allclose(q, h @ stored(w["wq"]), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(logits, h @ stored(w["table_t"]), rtol=1e-5, atol=1e-4)


def test_a_graph_past_the_protobuf_limit_writes_its_weights_from_their_files_beside_it(tmp_path, monkeypatch):
    """Past 2 GiB (here with the threshold lowered) the weights go from their files under the folder
    straight into model.onnx.data, never into one protobuf: a 1B model's float graph (--quant none)
    could not be written otherwise. The pair computes what the single file computes, bit for bit,
    each weight from 1 MiB up starts on a 64 KiB boundary, and the graph serialized stays as it was."""
    folder = tmp_path / "weights"
    folder.mkdir()
    onnx.save_model(small_graph(), folder / "exported.onnx", save_as_external_data=True, location="exported.onnx.data",
                    size_threshold=0)
    model = onnx.load(folder / "exported.onnx", load_external_data=False)
    before = model.SerializeToString(deterministic=True)
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_ALIGN_FROM", 64 * 64 * 4)  # the tables and wq, not wk
    files = onnx_graph.serialize(model, "model.onnx", folder)
    assert model.SerializeToString(deterministic=True) == before and files == onnx_graph.serialize(model, "model.onnx", folder)
    assert sorted(files) == ["model.onnx", "model.onnx.data"] and len(files["model.onnx"]) < 1000
    offsets = {t.name: {e.key: int(e.value) for e in t.external_data if e.key != "location"}
               for t in onnx.load_from_string(files["model.onnx"]).graph.initializer}
    assert {n: o["offset"] % onnx_graph.EXTERNAL_DATA_ALIGNMENT == 0 for n, o in offsets.items()} == {
        "table": True, "table_t": True, "wq": True, "wk": False}  # wk packed right after wq
    assert len(files["model.onnx.data"]) == max(o["offset"] + o["length"] for o in offsets.values())

    pair, single = tmp_path / "pair", tmp_path / "single"
    for where, written in ((pair, files), (single, onnx_graph.serialize(small_graph(), "model.onnx"))):
        where.mkdir()
        for name, data in written.items():
            (where / name).write_bytes(data)
    inputs = {"x": np.random.default_rng(1).standard_normal((1, 3, 64)).astype(np.float32), "ids": np.array([[0, 5, 99]], np.int64)}
    for got, want in zip(session(pair / "model.onnx").run(None, inputs), session(single / "model.onnx").run(None, inputs)):
        np.testing.assert_array_equal(got, want)


def test_the_checker_reads_a_graph_whose_weights_are_in_files(tmp_path):
    onnx.save_model(small_graph(), tmp_path / "exported.onnx", save_as_external_data=True, location="exported.onnx.data",
                    size_threshold=0)
    model = onnx.load(tmp_path / "exported.onnx", load_external_data=False)
    onnx_graph.check_graph(model, tmp_path)
    model.graph.node[2].input[1] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        onnx_graph.check_graph(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported.onnx", "exported.onnx.data"]  # no check file left


def test_the_exported_module_weights_are_not_held_after_the_export(tmp_path):
    """torch.onnx's graph outlives the export (onnxscript's rewrite rules keep the last graph they
    matched), and it pointed at the module's weight tensors: MNN's rounded copy of a 1B model stayed
    in memory through the smoke, 4.6 GiB. Once the export returns, a module let go is freed."""
    import gc
    import weakref

    from transformers import PretrainedConfig

    from edgepack.exporters.onnx_capture import OnnxSignature, export_onnx

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 64)
            self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)
            self.config = PretrainedConfig(num_attention_heads=1)  # what export_onnx's attention switch reads

        def forward(self, ids):
            return self.down(torch.relu(self.up(self.embed(ids))))

    module = Model().eval()
    weights = [weakref.ref(p) for p in module.parameters()]
    signature = OnnxSignature(module, (torch.zeros(1, 3, dtype=torch.int64),), {}, None, ["ids"], ["out"], ())
    model = export_onnx(signature, module, 18, weights_dir=tmp_path)
    assert {"embed.weight", "up.bias", "down.bias"} <= {t.name for t in model.graph.initializer}  # weights in files
    del module, signature
    gc.collect()
    assert [w() for w in weights if w() is not None] == []


def test_onnxruntime_folds_the_offsets_into_float_constants_when_it_loads(tmp_path):
    """The offset grid stores its offsets int8 with a float32 scale per row; the Casts, Muls and
    Transposes that make them float32 read constants only, and onnxruntime folds them at load: the
    graph it runs holds none of them, only the side product's own nodes (block sums, MatMul, Add)."""
    import onnxruntime as ort

    (tmp_path / "model.onnx").write_bytes(rewritten(small_graph(), None, offset_blocks)["model.onnx"])
    stored = onnx.load(tmp_path / "model.onnx")
    int8 = [t for t in stored.graph.initializer if t.data_type == TensorProto.INT8]
    assert len(int8) == 2  # the q/k stack's offsets and the tied table's
    prologue = [n for n in stored.graph.node if n.op_type in ("Cast", "Mul", "Transpose")]
    assert len(prologue) >= 3 * len(int8)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert not [n.name for n in optimized.graph.node if n.op_type in ("Cast", "Mul", "Transpose")]
    assert [n.op_type for n in optimized.graph.node].count("Add") == 1 + 3  # the residual, and the stack's, the head's and the lookup's offsets
