"""write_metadata on a model whose weights are stored past the flatbuffer, by offset, as
ai_edge_quantizer writes every buffer of 1 KB or more: the weights come back byte for byte, and
the re-serialization takes one copy per buffer, not one Python call per byte (that took 117 s of
a 135M model's 6.7-minute TFLite export). And the tensor names it shortens on the way."""

from __future__ import annotations

import time

import numpy as np

from edgepack.exporters.tflite.metadata import (
    ModelDoc,
    TensorDoc,
    pack_sharing_quantization,
    read_metadata,
    shorten_tensor_names,
    write_metadata,
)

WEIGHT_BYTES = 16 << 20  # 16 MB: about 20 s through the per-byte path on this host, 0.1 s as one copy


def _model_with_offset_buffer(weights: bytes) -> bytes:
    """A one-tensor-in, one-tensor-out model whose buffer 1 lies past the flatbuffer, by offset."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    def tensor(name: str, buffer: int, shape: list[int]):
        t = schema.TensorT()
        t.name, t.buffer, t.shape, t.type = name.encode(), buffer, shape, schema.TensorType.UINT8
        return t

    graph = schema.SubGraphT()
    graph.tensors = [tensor("x", 0, [1]), tensor("y", 0, [1]), tensor("w", 1, [len(weights)])]
    graph.inputs, graph.outputs, graph.operators = [0], [1], []
    model = schema.ModelT()
    model.version, model.subgraphs, model.operatorCodes = 3, [graph], []
    placeholder = schema.BufferT()
    placeholder.offset = placeholder.size = 1  # non-default, so the fields exist to be patched
    model.buffers = [schema.BufferT(), placeholder]
    packed = bytearray(flatbuffer_utils.convert_object_to_bytearray(model))
    offset = (len(packed) + 15) & ~15
    packed += bytes(offset - len(packed)) + weights
    flatbuffer_utils.update_packed_buffer(schema.Model.GetRootAs(packed).Buffers(1), offset=offset, size=len(weights))
    return bytes(packed)


def test_weights_stored_by_offset_come_back_unchanged_in_one_copy():
    from ai_edge_litert.tools import flatbuffer_utils

    weights = np.random.default_rng(0).integers(0, 256, WEIGHT_BYTES, dtype=np.uint8).tobytes()
    doc = ModelDoc(name="m", version="1", description="d", author="a", license="l",
                   inputs=(TensorDoc("x", "in"),), outputs=(TensorDoc("y", "out"),), facts={"k": 1},
                   files={"tokenizer.json": b"{}"})
    start = time.perf_counter()
    written = write_metadata(_model_with_offset_buffer(weights), doc)
    seconds = time.perf_counter() - start

    assert seconds < 5, f"write_metadata took {seconds:.1f} s for {WEIGHT_BYTES >> 20} MB of weights"
    model = flatbuffer_utils.read_model_from_bytearray(written)
    assert bytes(model.buffers[1].data) == weights
    read = read_metadata(written)
    assert read["metadata"]["name"] == "m" and read["facts"] == {"k": 1}
    assert read["files"]["tokenizer.json"] == b"{}"


def test_tensor_names_become_module_paths_and_stay_unique():
    """litert-torch names a tensor by the scope paths of the modules it came from, up to 900 bytes
    each (2.8 MB of the real SmolLM2-135M's 92 MB file); they become module paths. Names that are
    not class paths stay, and a short form that another tensor already has is not taken."""
    from ai_edge_litert import schema_py_generated as schema

    def layer(i: int, proj: str) -> str:
        return ("edgepack.exporters.decoder.ExplicitCacheLM/transformers.models.llama.modeling_llama.LlamaForCausalLM_model/"
                f"transformers.models.llama.modeling_llama.LlamaDecoderLayer_{i}/"
                f"transformers.models.llama.modeling_llama.LlamaAttention_self_attn/torch.nn.modules.linear.Linear_{proj}")

    names = ["decode_kv_cache_k_0", "arith.constant12_scales", f"{layer(3, 'q_proj')};2",
             f"{layer(3, 'k_proj')};;{layer(0, 'q_proj')};", "model.4.self_attn.o_proj", layer(4, "o_proj"),
             "edgepack.exporters.decoder.ExplicitCacheLM;2", ""]
    tensors = []
    for name in names:
        tensors.append(schema.TensorT())
        tensors[-1].name = name.encode()
    shorten_tensor_names(tensors)
    assert [t.name.decode() for t in tensors] == [
        "decode_kv_cache_k_0", "arith.constant12_scales", "model.3.self_attn.q_proj;2",
        "model.3.self_attn.k_proj;;model.0.self_attn.q_proj;", "model.4.self_attn.o_proj", layer(4, "o_proj"),
        "ExplicitCacheLM;2", ""]


def test_equal_quantization_is_stored_once():
    """A weight read by two subgraphs (prefill and decode) has a tensor in each with the same
    per-channel scales; per-channel int8 zero points are all zeros. write_metadata packs each
    table of equal parameters once and each equal vector once, and the parameters read back as
    they were."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    rows = 4096
    rng = np.random.default_rng(0)
    scales = {"w": rng.random(rows).astype(np.float32), "v": rng.random(rows).astype(np.float32)}

    def tensor(name: str):
        t = schema.TensorT()
        t.name, t.buffer, t.shape, t.type = name.encode(), 0, [rows, 1], schema.TensorType.INT8
        q = schema.QuantizationParametersT()
        q.scale, q.zeroPoint, q.quantizedDimension = scales[name], np.zeros(rows, np.int64), 0
        t.quantization = q
        return t

    def graph():
        g = schema.SubGraphT()
        g.tensors, g.inputs, g.outputs, g.operators = [tensor("w"), tensor("v")], [0], [1], []
        return g

    model = schema.ModelT()
    model.version, model.subgraphs, model.operatorCodes, model.buffers = 3, [graph(), graph()], [], [schema.BufferT()]
    plain = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    doc = ModelDoc(name="m", version="1", description="d", author="a", license="l",
                   inputs=(TensorDoc("w", "in"),), outputs=(TensorDoc("v", "out"),), facts={}, files={})
    written = write_metadata(plain, doc)

    root = schema.Model.GetRootAs(written)
    tables = [[root.Subgraphs(g).Tensors(t).Quantization()._tab.Pos for t in range(2)] for g in range(2)]
    assert tables[0] == tables[1] and tables[0][0] != tables[0][1]  # w once, v once
    # w's scales, v's scales and one zero vector (16 bytes a row) where each subgraph had all four
    # (24 bytes a row): 32 bytes a row saved, less the metadata and packed facts written beside them
    assert len(plain) - len(written) >= 32 * rows - 2048, (len(plain), len(written))
    for g in flatbuffer_utils.read_model_from_bytearray(written).subgraphs:
        for t in g.tensors:
            name = t.name.decode()
            assert np.array_equal(t.quantization.scale, scales[name]) and not t.quantization.zeroPoint.any()
    # the model object is left as it was: packed again, plainly or sharing, the same bytes
    sharing = bytes(pack_sharing_quantization(model))
    assert bytes(flatbuffer_utils.convert_object_to_bytearray(model)) == plain
    assert bytes(pack_sharing_quantization(model)) == sharing and len(sharing) < len(plain)
