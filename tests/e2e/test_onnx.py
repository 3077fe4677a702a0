"""The ONNX backend on the real exporter (torch.onnx, dynamo), checker (onnx) and runtime
(onnxruntime's InferenceSession), its weights read back from the file by the contrib ops' documented
layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepack.cases import cosine
from edgepack.packaging.manifest import read_manifest
from edgepack.quant import QuantSpec
from tests.conftest import REPO_ROOT, export_json, offset_grid_weights, run_cli


def _model(path: Path):
    import onnx

    return onnx.load(str(path))


def _initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _offsets(model, node, constants: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray | None:
    """The offset grid's per-block offsets [out, blocks] added to `node`'s output, found by
    walking the graph, not by name: an Add of the node's output and a MatMul one of whose inputs
    comes (through Transpose or Gather) from a float constant of that shape (`constants`: int8
    codes times their rows' scales, as onnxruntime folds them)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    for add in (n for n in model.graph.node if n.op_type == "Add" and node.output[0] in n.input):
        term = producer.get(next(i for i in add.input if i != node.output[0]))
        todo = list(term.input) if term is not None and term.op_type == "MatMul" else []
        while todo:
            name = todo.pop()
            if name in producer and producer[name].op_type in ("Transpose", "Gather"):
                todo.extend(producer[name].input)
            elif name in constants and constants[name].dtype == np.float32 and constants[name].shape == shape:
                return constants[name]
    return None


def _unpack4(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1)[:, :k].astype(np.float32) - 8


def _constants(model) -> dict[str, np.ndarray]:
    """Initializers, and what the graph computes from them alone before anything else (the Casts,
    Transposes and Reshapes onnxruntime folds when it loads the model)."""
    values = _initializers(model)
    for node in model.graph.node:
        if not all(i in values for i in node.input):
            continue
        a, x = _attrs(node), values.get(node.input[0]) if node.input else None
        if node.op_type == "Cast":
            values[node.output[0]] = x.astype(np.float32)
        elif node.op_type == "Transpose":
            values[node.output[0]] = np.transpose(x, a.get("perm"))
        elif node.op_type == "Reshape":
            values[node.output[0]] = x.reshape(values[node.input[1]])
        elif node.op_type == "Mul":
            values[node.output[0]] = x * values[node.input[1]]
    return values


def _stored(model) -> list[tuple[str, int, int, np.ndarray, np.ndarray]]:
    """Every MatMulNBits / GatherBlockQuantized weight read back from the file as (op, bits,
    block_size, scales [out, blocks], dequantized [out, in] float32), decoded by the contrib ops'
    documented layouts (4 bits: uint4 with zero point 8 packed low nibble first, or for
    onnxruntime's Gather quantizer signed int4; 8 bits: uint8 with zero point 128), plus each
    block's offset on the offset grid, independently of edgepack."""
    values = _constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    head_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    stored = []
    for node in model.graph.node:
        a = _attrs(node)
        bits = a.get("bits", 4)
        if node.op_type == "MatMulNBits":
            packed, scales = values[node.input[1]], values[node.input[2]]
            n, k, block = a["N"], a["K"], a["block_size"]
            q = _unpack4(packed, n, k) if bits == 4 else packed.reshape(n, -1)[:, :k].astype(np.float32) - 128
        elif node.op_type == "GatherBlockQuantized" and not (  # a tied table reads the LM head's weight: decoded there
                node.input[0] in producer and producer[node.input[0]].input[0] in head_weights):
            data, scales, block = values[node.input[0]], values[node.input[2]], a["block_size"]
            n = data.shape[0]
            if bits == 4 and data.dtype == np.uint8:  # MatMulNBits' packed layout
                q = _unpack4(data, n, data.shape[1] * 2)
            else:
                q = data.astype(np.float32) - (128 if bits == 8 else 0)
        else:
            continue
        k = q.shape[1]
        scales = scales.reshape(n, -1)
        weight = q * np.repeat(scales, block, axis=1)[:, :k]
        offsets = _offsets(model, node, values, scales.shape)
        if offsets is not None:
            weight = weight + np.repeat(offsets, block, axis=1)
        stored.append((node.op_type, bits, block, scales, weight))
    return stored


def _holds_rows(stored: np.ndarray, weight: np.ndarray) -> bool:
    """Whether `weight` is a run of `stored`'s rows (layers that read one input are stored as one)."""
    rows = weight.shape[0]
    return stored.shape[1] == weight.shape[1] and any(
        np.array_equal(stored[i:i + rows], weight) for i in range(stored.shape[0] - rows + 1))


def _dequantized(model) -> list[np.ndarray]:
    return [weight for *_, weight in _stored(model)]


@pytest.mark.slow
def test_smoke_matches_the_quantized_reference_token_for_token(onnx_export):
    code, summary, bundle = onnx_export
    assert code == 0, summary
    fidelity = read_manifest(bundle)["comparisons"]["lowering_fidelity"]["onnx"]
    greedy = fidelity["cases"]["greedy"]
    assert fidelity["passed"] and greedy["tokens_match"] and greedy["top1_agreement"] == 1.0
    # The reference reproduces the int4 weights (checked bit for bit above) and MatMulNBits' int8
    # activation blocks; the prefill matches to 1e-5. On the demo model fitted 2026-11-23 some
    # single-token decode steps differ by up to 0.14 (deterministic; the same with the reference
    # built on the artifact's own growing-cache graph; no per-block, per-row or rounding variant of
    # the activation quantization closes it): a difference inside onnxruntime's M=1 MatMulNBits
    # path not yet modelled. The bound is set just above what was measured.
    assert greedy["min_cosine"] >= 0.9999 and greedy["max_abs_diff"] < 0.2, greedy
    result = run_cli("smoke", bundle, "--json")
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_graph_has_genai_io_and_every_linear_layer_is_matmulnbits(onnx_export, llama_dir):
    import onnx

    from edgepack.exporters.sources import load_source

    bundle = onnx_export[2]
    model = _model(bundle / "onnx/model.onnx")
    onnx.checker.check_model(model, full_check=True)
    caches = [f"{kind}.{i}.{part}" for i in range(2) for kind, part in (("k", "key"), ("v", "value"))]
    assert [i.name for i in model.graph.input] == ["input_ids", "position_ids"] + [
        f"past_key_values.{c.split('.', 1)[1]}" for c in caches]
    assert [o.name for o in model.graph.output] == ["logits"] + [f"present.{c.split('.', 1)[1]}" for c in caches]
    # the memory report's KV cache is these inputs: fp32 [1, kv heads, past, head dim], growing with the tokens
    past = [i.type.tensor_type for i in model.graph.input if i.name.startswith("past_key_values.")]
    assert all(t.elem_type == onnx.TensorProto.FLOAT for t in past)
    per_token = sum(4 * int(np.prod([d.dim_value for d in t.shape.dim if d.dim_value])) for t in past)
    kv = read_manifest(bundle)["artifacts"][0]["memory"]["kv_cache"]
    assert (kv["dtype"], kv["allocation"], kv["bytes_per_token"]) == ("float32", "growing", per_token)
    assert kv["bytes_at_max_context"] == per_token * kv["max_context"] and kv["bytes_per_1000_tokens"] == 1000 * per_token
    ops = [n.op_type for n in model.graph.node]
    linears = sum(isinstance(m, torch.nn.Linear) for m in load_source(str(llama_dir)).module.modules())
    assert linears == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
    # q, k and v read one input, as gate and up do: one MatMulNBits each; gate and up are split
    # after the offset term, q, k and v go packed into the attention
    assert ops.count("MatMulNBits") == 2 * 4 + 1 and ops.count("Split") == 2 and ops.count("GatherBlockQuantized") == 1
    graph = read_manifest(bundle)["artifacts"][0]["runtime"]["graph"]
    assert (graph["linear_matmuls"], graph["linear_matmuls_fused"], graph["matmul_nbits"]) == (linears, 2 * 3, 2 * 4 + 1)
    # No float weight is left: the only float32 matrices stored are the offset grid's 0/1 block
    # indicators and its offsets' per-row scales; the offsets themselves are int8 (1/32 of a weight).
    weights = _initializers(model)
    matrices = [w for w in weights.values() if w.ndim == 2]
    assert all(np.isin(w, (0, 1)).all() or w.shape[1] == 1 for w in matrices if w.dtype == np.float32)
    assert {w.dtype for w in matrices} == {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int8)}
    assert all(a["accuracy_level"] == 4 and a["bits"] == 4 and a["block_size"] == 32
               for n in model.graph.node if n.op_type == "MatMulNBits" for a in [_attrs(n)])
    # Each layer's attention is one fused GroupQueryAttention reading its past and writing its
    # present (no Concat of the cache, no Softmax left in the graph).
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert [(n.domain, n.input[3], n.input[4], n.output[1], n.output[2]) for n in attention] == [
        ("com.microsoft", f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key",
         f"present.{i}.value") for i in range(2)]
    assert "Softmax" not in ops and all(n.input[1] == n.input[2] == "" for n in attention)
    assert graph["group_query_attention"] == graph["attention_inputs_packed"] == 2
    # Each residual Add and the RMSNorm after it are one SkipSimplifiedLayerNormalization (every
    # norm but layer 0's, which reads the embedding); q, k and v reach the attention without the
    # Reshapes into heads and back; the offset term's block sums are a Reshape and a ReduceSum.
    assert ops.count("SkipSimplifiedLayerNormalization") == graph["skip_rms_norms_fused"] == 2 * 2 and ops.count("Pow") == 1
    assert ops.count("ReduceSum") == 2 * 4 + 1 and ops.count("Reshape") == 2 * 4 + 1 + 1  # + the tied table's rows
    assert graph["nodes"] == len(ops)


def _tied_table_read_once(model) -> None:
    """The embedding's GatherBlockQuantized reads the LM head's packed MatMulNBits weight."""
    [gather] = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    [rows] = [n for n in model.graph.node if n.output[0] == gather.input[0]]
    head = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == rows.input[0]]
    assert rows.op_type == "Reshape" and len(head) == 1 and _attrs(gather)["bits"] == 4
    assert gather.input[2] == head[0].input[2]


@pytest.mark.slow
def test_offset_grid_weights_span_each_blocks_range_and_are_the_references(onnx_export, llama_dir):
    """The default grid read back from the file: each block of 32 spans exactly the fitted block's
    [min, max] (codes 0 and 15; up to the int8 offset's rounding; the fit runs under --mixed-precision
    off too), every weight is within half a step of the fitted value, and the stored values are
    those the smoke's reference computes with."""
    from edgepack.exporters.onnx.lower import offset_parts
    from edgepack.exporters.sources import load_source

    bundle = onnx_export[2]
    manifest = read_manifest(bundle)
    [art] = manifest["artifacts"]
    assert art["quantization"]["grid"] == "offset" and manifest["quantization"]["block_fit"]["backends"] == ["onnx"]
    model = _model(bundle / art["path"])
    module = load_source(str(llama_dir)).module
    module.load_state_dict({name: torch.from_numpy(w) for name, w in offset_grid_weights(llama_dir).items()})
    weights = [p.detach() for p in module.parameters() if p.ndim == 2]
    for layer in module.model.layers:  # the layers that read one input are stored as one, rows stacked
        attention, mlp = layer.self_attn, layer.mlp
        weights += [torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).detach(),
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()]
    found = _stored(model)
    assert len(found) == 2 * 4 + 1  # qkv, o, gate-up and down a layer, the LM head; the tied embedding stored once
    for op, bits, block, scales, w in found:
        matches = [f for f in weights if f.shape == w.shape
                   and np.abs(f.numpy() - w).max() <= scales.max() / 2 + 1e-3 * np.abs(f.numpy()).max()]
        [float_weight] = matches
        blocks, stored = float_weight.numpy().reshape(w.shape[0], -1, block), w.reshape(w.shape[0], -1, block)
        symmetric, offsets = offset_parts(float_weight, block)
        # half an int8 step of the row's largest offset, and the fp16 scales' rounding
        slack = offsets.abs().amax(dim=1, keepdim=True).numpy() / 254 * (1 + 1e-5) + 2 ** -10 * np.abs(stored).max()
        assert (np.abs(stored.max(-1) - blocks.max(-1)) <= slack).all() and (np.abs(stored.min(-1) - blocks.min(-1)) <= slack).all()
        np.testing.assert_array_equal(w, (symmetric + offsets.repeat_interleave(block, dim=1)).numpy())
    _tied_table_read_once(model)
    runtime = art["runtime"]
    assert runtime["quantized_bytes"] == art["bytes"] and art["bytes"] * 4 < runtime["float_bytes"]
    # Weights: 4 bits + an fp16 scale and an int8 offset per 32 (4.75 bits, and a float32 scale
    # per row; the ideal counts fp16 offsets, 5 bits); the rest of the file is the graph and the fp32 norms.
    assert sum(w.size * 4.75 for *_, w in found) / 8 <= art["ideal_bytes"]
    assert art["bytes"] <= 1.6 * art["ideal_bytes"], (art["bytes"], art["ideal_bytes"])


@pytest.mark.slow
def test_symmetric_grid_stores_the_references_blocks_exactly_and_is_smaller(onnx_export, llama_dir, tmp_path):
    """--onnx-grid symmetric: onnxruntime's grid with fp16 scales, every stored weight bit for bit
    the reference's (layers that read one input stacked, as on the offset grid), the smoke passing
    token for token, and a smaller file than the offset grid, at 4.5 bits a weight."""
    from edgepack.exporters.onnx.lower import rounding
    from edgepack.exporters.sources import load_source
    from edgepack.exporters.weights import weight_only_reference

    code, summary = export_json(str(llama_dir), "--target", "onnx", "--mixed-precision", "off", "--onnx-grid", "symmetric",
                                "--out", str(tmp_path))
    assert code == 0, summary
    manifest = read_manifest(tmp_path / "tiny-llama")
    [art] = manifest["artifacts"]
    assert art["quantization"]["grid"] == "symmetric" and "fp16 scales" in art["quantization"]["library"]
    greedy = manifest["comparisons"]["lowering_fidelity"]["onnx"]["cases"]["greedy"]
    assert greedy["tokens_match"] and greedy["top1_agreement"] == 1.0
    model = _model(tmp_path / "tiny-llama" / art["path"])
    reference = weight_only_reference(load_source(str(llama_dir)).module, QuantSpec.from_options("int4", 32), rounding)
    expected = [p.detach().numpy() for p in reference.parameters() if p.ndim == 2]
    found = _dequantized(model)
    # q, k and v stacked, gate and up stacked, o, down per layer; the tied table stored once
    assert len(found) == 2 * 4 + 1 and sum(w.shape[0] for w in found) == sum(e.shape[0] for e in expected)
    for e in expected:
        assert any(_holds_rows(w, e) for w in found)
    _tied_table_read_once(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Split") == 2 and ops.count("MatMulNBits") == 2 * 4 + 1
    [offset_art] = read_manifest(onnx_export[2])["artifacts"]
    assert art["bytes"] < offset_art["bytes"] and sum(w.size * 4.5 for w in found) / 8 <= 1.12 * art["ideal_bytes"]


@pytest.mark.slow
def test_genai_config_and_metadata_agree_with_the_manifest(onnx_export):
    from edgepack.exporters.onnx.runtime import session

    bundle = onnx_export[2]
    manifest = read_manifest(bundle)
    config = json.loads((bundle / "onnx/genai_config.json").read_text())
    arch, tok, gen = manifest["model"]["architecture"], manifest["tokenizer"], manifest["generation"]
    model, decoder = config["model"], config["model"]["decoder"]
    assert model["type"] == "llama" and model["context_length"] == gen["max_seq_len"] == 512
    assert model["eos_token_id"] == tok["eos_ids"] == [1, 2]
    assert (model["bos_token_id"], model["pad_token_id"], model["vocab_size"]) == (tok["bos_id"], tok["pad_id"], arch["vocab_size"])
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"], decoder["hidden_size"]) == (
        arch["n_layers"], arch["n_heads"], arch["n_kv_heads"], arch["head_dim"], arch["hidden_size"])
    assert config["search"]["past_present_share_buffer"] is True and config["search"]["max_length"] == 512
    sess = session(bundle / decoder["filename"].join(["onnx/", ""]))
    inputs, outputs = {i.name for i in sess.get_inputs()}, {o.name for o in sess.get_outputs()}
    for i in range(decoder["num_hidden_layers"]):
        assert {decoder["inputs"]["past_key_names"] % i, decoder["inputs"]["past_value_names"] % i} <= inputs
        assert {decoder["outputs"]["present_key_names"] % i, decoder["outputs"]["present_value_names"] % i} <= outputs
    assert {decoder["inputs"]["input_ids"], decoder["inputs"]["position_ids"]} <= inputs
    for f in tok["files"]:  # the folder loads on its own: the tokenizer sits beside the model
        assert (bundle / "onnx" / Path(f["path"]).name).read_bytes() == (bundle / f["path"]).read_bytes()
    props = sess.get_modelmeta().custom_metadata_map
    assert props["name"] == manifest["name"] and props["edgepack_version"] == manifest["toolchain"]["edgepack"]
    facts = json.loads(props["tokenizer"])
    assert (facts["bos_id"], facts["eos_ids"], facts["chat_template"]) == (tok["bos_id"], tok["eos_ids"], tok["chat_template"])


@pytest.mark.slow
@pytest.mark.parametrize("share_buffer", [True, False], ids=["shared_buffer", "growing_cache"])
def test_onnxruntime_genai_runs_the_smoke_case(onnx_export, tmp_path, share_buffer):
    """The smoke's onnxruntime-genai row (the generation loop ONNX Runtime's LLM apps run, loading
    onnx/ by its genai_config.json): every teacher-forced step within the artifact's tolerance of
    the reference, the greedy tokens the reference's. As shipped (one buffer of the context per
    layer, written in place by the attention op) and with the cache growing (past and present
    apart, as genai runs other models); the old lengths (from the past's shape) failed the first."""
    from edgepack.packaging.smoke import smoke_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_export[2], bundle)
    config_path = bundle / "onnx" / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["search"]["past_present_share_buffer"] = share_buffer
    config_path.write_text(json.dumps(config))
    manifest = read_manifest(bundle)
    [row] = [r for r in smoke_bundle(bundle, manifest, backends=["onnx"]) if r.backend == "genai"]
    greedy = row.cases["greedy"]
    assert row.passed and not greedy["failures"] and greedy["steps_verified"] == 16, row.as_dict()
    assert greedy["min_cosine"] >= manifest["smoke"]["tolerance"]["min_cosine"] and greedy["free_running"]["tokens_match"]


# Mixed precision on the tiny BERT: int8 per channel for two tables and three linear layers (one
# 128 wide: two MatMulNBits blocks of 64 sharing the row's scale), int4 g32 for the rest.
MIXED_INT8 = ("model.embeddings.position_embeddings", "model.embeddings.token_type_embeddings",
              "model.encoder.layer.0.attention.self.value", "model.encoder.layer.1.intermediate.dense",
              "model.encoder.layer.1.output.dense")


@pytest.fixture(scope="module")
def mixed_bert(bert_dir, tmp_path_factory):
    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.mixed_precision import INT8
    from edgepack.exporters.onnx.lower import MODEL_FILE, Options, lower
    from edgepack.exporters.sources import load_source

    captured = capture(load_source(str(bert_dir)), CaptureOptions(pooling="mean"))
    spec = QuantSpec.from_options("int4").with_overrides({name: INT8 for name in MIXED_INT8},
                                                         plan={"method": "chosen by the test"})
    artifact = lower(captured, spec, Options())
    out = tmp_path_factory.mktemp("mixed-onnx")
    for name, data in artifact.files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return captured, spec, artifact, out / MODEL_FILE


def test_mixed_precision_stores_each_layer_as_planned_and_matches_its_reference(mixed_bert):
    """Each layer's weight, read back from the file and decoded independently of edgepack, is
    exactly the reference's image of that layer under its own plan entry, in an op of that bit
    width and granularity; ONNX Runtime then reproduces the reference's sentence embeddings."""
    from edgepack.cases import compare, run_case
    from edgepack.exporters.onnx.lower import offset_parts, rounding
    from edgepack.exporters.onnx.runtime import onnx_host, session
    from edgepack.exporters.weights import weight_only_reference

    captured, spec, artifact, path = mixed_bert
    stored = _stored(_model(path))
    reference = dict(weight_only_reference(captured.module, spec, rounding).named_modules())
    floats = dict(captured.module.named_modules())
    placed = 0
    for name, wq in spec.layers(captured.module).items():
        weight = reference[name].weight.detach().numpy()
        if wq.bits == 4:  # the default offset grid
            symmetric, offsets = offset_parts(floats[name].weight, wq.group_size)
            weight = (symmetric + offsets.repeat_interleave(wq.group_size, dim=1)).numpy()
        found = [s for s in stored if _holds_rows(s[4], weight)]
        if name == "model.pooler.dense":  # mean pooling: the pooler is not in the graph
            assert not found
            continue
        [(op, bits, block, scales, _)] = found
        assert op == ("MatMulNBits" if isinstance(reference[name], torch.nn.Linear) else "GatherBlockQuantized")
        assert bits == wq.bits == (8 if name in MIXED_INT8 else 4), name
        if wq.group_size:
            assert block == wq.group_size and scales.shape[1] == weight.shape[1] // block, name
        else:  # one scale per output channel (repeated over a linear row's blocks)
            assert (scales == scales[:, :1]).all() and (op == "MatMulNBits" or scales.shape[1] == 1), name
        placed += 1
    # layer 0's q and k (its v is int8) are one MatMulNBits, and layer 1's q, k and v another
    assert placed == 15 and len(stored) == 15 - 3
    runtime = artifact.runtime.as_dict()
    assert runtime["graph"]["linear_matmuls_fused"] == 3
    assert runtime["graph"]["bits"] == {"GatherBlockQuantized": {"4": 1, "8": 2}, "MatMulNBits": {"4": 9 - 3, "8": 3}}
    quant = artifact.quantization.as_dict()
    assert set(quant["overrides"]) == set(MIXED_INT8) and set(quant["ops"]) == {"int4 g32", "int8 per-channel sym"}
    assert "offset" in quant["ops"]["int4 g32"]["linear"] and quant["grid"] == "offset"
    assert set(quant["ops"]["int8 per-channel sym"]) == {"linear", "embedding"}
    props = session(path).get_modelmeta().custom_metadata_map
    assert json.loads(props["quantization"]) == json.loads(json.dumps(spec.describe()))
    # The offset grid's side product (3 nodes a layer, a 0/1 block indicator per input width) is
    # ~25 KB here, a third of this tiny model (measured 1.31x); on SmolLM2-135M the file is 1.01x.
    assert runtime["quantized_bytes"] <= 1.4 * artifact.ideal_bytes, (runtime["quantized_bytes"], artifact.ideal_bytes)

    [method] = artifact.methods
    call = onnx_host(path, {"methods": [{"inputs": [{"name": t.name} for t in method.inputs],
                                         "outputs": [{"name": t.name} for t in method.outputs]}]})
    for case in captured.cases:
        metrics = compare(artifact.reference.outputs[case.name], run_case(case, call))
        assert metrics["min_cosine"] >= 0.9999 and metrics["max_abs_diff"] < 1e-4, (case.name, metrics)


def test_mixed_precision_lowers_to_identical_bytes(mixed_bert):
    from edgepack.exporters.onnx.lower import Options, lower

    captured, spec, artifact, _ = mixed_bert
    assert lower(captured, spec, Options()).files == artifact.files


def _minilm_export(minilm_dir: Path, tmp_path: Path, *quant: str) -> tuple[Path, dict]:
    code, summary = export_json(str(minilm_dir), "--name", "minilm", "--target", "onnx", *quant, "--out", str(tmp_path))
    assert code == 0, summary
    manifest = read_manifest(tmp_path / "minilm")
    return tmp_path / "minilm", manifest


def _sentence_cosines(bundle: Path, manifest: dict) -> list[float]:
    """The artifact on ONNX Runtime against fp32 eager: the mean-pooled sentence embedding of each
    of the capture's real sentences."""
    from edgepack.exporters.onnx.runtime import onnx_host

    [art] = manifest["artifacts"]
    call = onnx_host(bundle / art["path"], art)
    cosines = []
    for case in manifest["smoke"]["cases"]:
        [hidden] = call("forward", [np.load(bundle / i["path"]) for i in case["inputs"]])
        fp32 = np.load(bundle / case["expected"]["fp32-eager"]["output_0"]["path"])
        cosines.append(cosine(hidden.mean(axis=1), fp32.mean(axis=1)))
    return cosines


@pytest.mark.slow
def test_minilm_fp32_onnx_embeddings_match_eager(minilm_dir, tmp_path):
    """The real MiniLM-L6 (22M parameters) lowered without quantization: every token's hidden
    state (recorded by the smoke harness as lowering_fidelity.onnx.cases.*.vs_fp32) and every
    sentence embedding within cosine 0.99 of fp32 eager."""
    bundle, manifest = _minilm_export(minilm_dir, tmp_path, "--quant", "none")
    cases = manifest["comparisons"]["lowering_fidelity"]["onnx"]["cases"]
    assert len(cases) == 3 and all(c["vs_fp32"]["min_cosine"] >= 0.99 for c in cases.values()), cases
    assert min(_sentence_cosines(bundle, manifest)) >= 0.99


@pytest.mark.slow
def test_minilm_int4_plan_is_faithful_to_its_reference_and_within_0_99_of_fp32(minilm_int4_export):
    """The default --quant int4 export of the real MiniLM-L6 with mean pooling (the shared export of
    every backend): mixed precision keeps the layers int4 costs most at int8 per channel (measured
    2026-11-23: 37 of 40, all but the word table, one attention output and the unused pooler), the
    artifact reproduces that mixed reference (measured min cosine 0.9992; asserted >= 0.995 as for
    uniform int4, kernels differ by CPU) and its sentence embeddings are within 0.99 of fp32 eager
    (measured 0.9977 / 0.9975 / 0.9963; 1.06x the ideal size). Every layer int4 g32 measured 0.918
    per token, 0.946 mean-pooled (2026-11-22): int4 round-to-nearest on MiniLM, which the plan
    exists to fix."""
    code, summary, bundle = minilm_int4_export
    assert code == 0, summary
    manifest = read_manifest(bundle)
    quant = manifest["quantization"]
    overrides, plan = quant["overrides"], quant["plan"]
    assert plan["floor_met"] and len(overrides) == plan["int8_layers"] > 0
    assert set(overrides.values()) == {"int8 per-channel sym"}
    tables = sum(".embeddings." in name for name in overrides)
    [art] = [a for a in manifest["artifacts"] if a["backend"] == "onnx"]
    graph = art["runtime"]["graph"]
    # 6 layers x (q, k, v, attention out, intermediate, out); the pooler is a 37th linear the
    # sentence-embedding graph does not use. Word, position and token-type tables: 3 embeddings.
    assert graph["linear_matmuls"] == 36 and graph["linear_layers"] == 37
    # Layers that read one input and are stored alike (q, k and v where the plan keeps them at one
    # precision) are one MatMulNBits: one node per attention's input and precision
    attention = [f"model.encoder.layer.{i}.attention.self.{part}" for i in range(6) for part in ("query", "key", "value")]
    stacks = {(name.rsplit(".", 1)[0], name in overrides) for name in attention}
    int8_stacks = sum(int8 for _, int8 in stacks)
    int8_single = len(overrides) - tables - sum(name in overrides for name in attention)
    assert graph["linear_matmuls_fused"] == len(attention) - len(stacks) and graph["matmul_nbits"] == 36 - len(attention) + len(stacks)
    assert graph["bits"]["MatMulNBits"] == {"4": graph["matmul_nbits"] - int8_stacks - int8_single, "8": int8_stacks + int8_single}
    assert sum(graph["bits"]["GatherBlockQuantized"].values()) == 3 and graph["bits"]["GatherBlockQuantized"].get("8", 0) == tables
    assert art["bytes"] < 1.15 * art["ideal_bytes"], (art["bytes"], art["ideal_bytes"])
    fidelity = manifest["comparisons"]["lowering_fidelity"]["onnx"]
    assert fidelity["passed"] and len(fidelity["cases"]) == 3
    for name, metrics in fidelity["cases"].items():
        assert metrics["min_cosine"] >= 0.995, (name, metrics)
        assert metrics["vs_fp32"]["min_cosine"] >= 0.99, (name, metrics["vs_fp32"])


def test_onnx_modules_import_in_one_process():
    code = ("import edgepack.exporters.onnx.lower, edgepack.exporters.onnx.runtime, edgepack.exporters.onnx.graph, "
            "edgepack.exporters.onnx.metadata, onnx, onnxruntime")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

