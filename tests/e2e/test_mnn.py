"""The MNN backend on MNN's own converter and runtime (PyPI mnn): the grid edgepack rounds to is the
one the converter stores, the graph's packed embedding lookup gives the stored rows, and the
exported LM answers like its reference token for token through MNN's Module API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgepack.exporters.mnn import lower as mnn_lower
from edgepack.exporters.mnn import runtime as mnn_runtime
from edgepack.exporters.registry import BACKENDS
from edgepack.packaging.manifest import read_manifest
from edgepack.quant import WeightQuant
from tests.conftest import export_json

pytestmark = pytest.mark.slow


def _effective_weight(tmp_path, weight: np.ndarray, wq: WeightQuant) -> np.ndarray:
    """What MNN computes with for a linear layer's [out, in] weight: a one-MatMul ONNX graph
    through the converter with the backend's flags, run on the identity."""
    import onnx
    from onnx import helper, numpy_helper

    out, cols = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", cols])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", out])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")])
    source, target = tmp_path / "linear.onnx", tmp_path / "linear.mnn"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), source)
    mnn_runtime.convert(source, target, mnn_lower.converter_flags(wq))
    module = mnn_runtime.load(target, ["x"], ["y"])
    [y] = mnn_runtime._run(module, [np.eye(cols, dtype=np.float32)])
    return y.T, target.stat().st_size


@pytest.mark.parametrize("wq", [WeightQuant(4, 32), WeightQuant(8, None)], ids=["int4-g32", "int8-per-channel"])
def test_the_converter_stores_exactly_the_grid_edgepack_rounds_to(tmp_path, wq):
    """Weights already on MNN's grid come back from its converter unchanged (so the reference holds
    what the .mnn holds); the raw weights would not."""
    torch.manual_seed(0)
    weight = torch.randn(48, 128) * 0.05 + torch.linspace(-0.02, 0.03, 128)  # blocks off zero: the minimum matters
    q, scale, minimum = mnn_lower.grid_image(weight, wq)
    image = mnn_lower._image(q.float(), scale, minimum).numpy()
    stored, size = _effective_weight(tmp_path, image, wq)
    step = float(scale.max())
    # MNN's low-memory kernels quantize each input row to int8 at run time: the identity's rows are exact
    assert np.abs(stored - image).max() <= 1e-3 * step, np.abs(stored - image).max()
    assert np.abs(image - weight.numpy()).max() <= 0.5001 * step  # and it is the weight, rounded
    # stored at the grid's bits: 4 bits + fp16 scale and minimum per 32, or 8 bits + an fp32 scale per row
    bits = {4: 4 + 32 / 32, 8: 8 + 32 / 128}[wq.bits]
    assert size <= weight.numel() * bits / 8 + 4096, size


def _packed_embedding(rows: int, cols: int) -> tuple[nn.Embedding, torch.Tensor]:
    """An embedding stored as the MNN export stores it, and the rounded table it must give back."""
    torch.manual_seed(0)
    layer = nn.Embedding(rows, cols)
    with torch.no_grad():
        layer.weight[: rows // 2] *= 1e-4  # scales spanning many exponents, some near fp16's subnormals
    q, scale, minimum = mnn_lower.grid_image(layer.weight, WeightQuant(4, 32))
    table = mnn_lower._image(q.float(), scale, minimum)
    mnn_lower._stored_lookup(layer, q, scale, minimum)
    return layer, table


def test_fp16_bytes_read_back_exactly():
    """Every finite fp16 value, subnormals and both zeros included, through the graph's decoding."""
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = bits[torch.isfinite(bits)]
    decoded = mnn_lower._fp16_from_bytes(mnn_lower._fp16_bytes(finite).float(), mnn_lower.FP16_POWERS)
    assert finite.numel() == 63488 and torch.equal(decoded, finite.float())
    assert torch.equal(torch.signbit(decoded), torch.signbit(finite))


def test_the_embedding_lookup_unpacks_the_stored_rows():
    """Codes two to a byte (low nibble first), fp16 scales and minimums as their bytes: the lookup
    gives exactly the rounded table's rows, and the table is stored at 5 bits a weight."""
    layer, table = _packed_embedding(40, 64)
    ids = torch.tensor([[3, 0, 39, 3, 25]])
    assert torch.equal(layer(ids), table[ids])
    stored = sum(layer.get_buffer(n).numel() * layer.get_buffer(n).element_size() for n in ("stored_codes", "stored_halves"))
    assert {layer.stored_codes.dtype, layer.stored_halves.dtype} == {torch.uint8} and stored * 8 == 40 * 64 * 5


def test_mnn_stores_the_embedding_at_5_bits_and_gives_its_rows_exactly(tmp_path):
    """Through MNN's converter and runtime: the .mnn holds the table in 5 bits a weight (an fp16
    table would be widened to fp32 by the converter: 6 bits), and the lookup is the rounded rows."""
    layer, table = _packed_embedding(4096, 64)
    ids = torch.tensor([[7, 4095, 0, 7, 2048, 1]])
    program = torch.onnx.export(layer, (ids,), dynamo=True, opset_version=mnn_lower.OPSET, input_names=["ids"],
                                output_names=["rows"], dynamic_shapes=({1: torch.export.Dim("n")},), verbose=False)
    source, target = tmp_path / "embedding.onnx", tmp_path / "embedding.mnn"
    program.save(source)
    mnn_runtime.convert(source, target, [])
    [rows] = mnn_runtime._run(mnn_runtime.load(target, ["ids"], ["rows"]), [ids.numpy().astype(np.int32)])
    assert np.array_equal(rows, table[ids].numpy())
    assert target.stat().st_size <= 4096 * 64 * 5 / 8 + 16384, target.stat().st_size


def test_mnn_answers_like_the_stored_weights(mnn_export, llama_dir):
    code, summary, bundle = mnn_export
    assert code == 0, json.dumps(summary)[:3000]
    manifest = read_manifest(bundle)
    [artifact] = manifest["artifacts"]
    assert artifact["path"] == "mnn/model.mnn" and artifact["runtime"]["name"] == "MNN"
    greedy = manifest["comparisons"]["lowering_fidelity"]["mnn"]["cases"]["greedy"]
    # MNN quantizes each layer's input to int8 at run time (low memory mode): the reference (fp32
    # math on the stored weights) must still be matched at every step, near-ties aside
    assert greedy["steps_verified"] == 16 and not greedy["failures"] and greedy["min_cosine"] >= 0.99, greedy
    assert all(m["near_tie"] for m in greedy.get("top1_mismatches", [])), greedy
    text = manifest["quality"]["artifacts"]["mnn"]
    assert text["passed"] and text["non_finite_steps"] == 0 and text["scored_tokens"] > 1000, text
    # at the default budget the offset grid's plan keeps every layer int4 (MNN's converter takes one width)
    plan = manifest["quantization"]["plan"]
    assert artifact["quantization"]["linear"] == "int4 g32" and plan["int8_layer_names"] == [], plan
    # every quantized weight at 5 bits: the file is its ideal size plus the graph
    assert artifact["bytes"] <= 1.1 * artifact["ideal_bytes"] + 96 * 1024, artifact


def test_config_names_what_an_app_feeds_and_the_file_says_who_made_it(mnn_export):
    _, _, bundle = mnn_export
    manifest = read_manifest(bundle)
    [artifact] = manifest["artifacts"]
    config = json.loads((bundle / "mnn" / "config.json").read_text())
    [method] = artifact["methods"]
    assert config["inputs"] == [t["name"] for t in method["inputs"]]
    assert config["outputs"] == [t["name"] for t in method["outputs"]]
    assert config["tokenizer"]["eos_ids"] == manifest["tokenizer"]["eos_ids"]
    assert config["decoder"]["context_length"] == manifest["generation"]["max_seq_len"]
    assert all((bundle / "mnn" / name).is_file() for name in config["tokenizer"]["files"])
    rows = dict(BACKENDS["mnn"].embedded_metadata(bundle / "mnn" / "model.mnn"))
    assert rows["made by"].startswith(f"edgepack (MNN converter {artifact['runtime']['version']}")
    assert rows["inputs"].startswith(f"{len(config['inputs'])}: input_ids, position_ids")


@pytest.mark.extended  # CI's 45-minute budget; the plan's int8 layers on the other backends are in make test
def test_a_plans_int8_layers_are_stored_at_8_bits(mnn_export, llama_dir, tmp_path):
    """--bits-per-weight 5.5 buys int8 layers: the converter stores them per channel (named one by one
    in its compression parameters) and the rest in 4-bit blocks; the file grows by what those layers'
    extra bits cost, and MNN still answers like the reference."""
    code, summary = export_json(str(llama_dir), "--target", "mnn", "--bits-per-weight", "5.5", "--out", str(tmp_path))
    assert code == 0, json.dumps(summary)[:3000]
    manifest = read_manifest(tmp_path / "tiny-llama")
    [artifact] = manifest["artifacts"]
    int8 = manifest["quantization"]["plan"]["int8_layer_names"]
    assert int8 and f"{len(int8)} layers stored otherwise" in artifact["runtime"]["converter"]
    greedy = manifest["comparisons"]["lowering_fidelity"]["mnn"]["cases"]["greedy"]
    assert greedy["steps_verified"] == 16 and not greedy["failures"] and greedy["min_cosine"] >= 0.99, greedy
    from transformers import AutoModelForCausalLM

    layers = dict(AutoModelForCausalLM.from_pretrained(llama_dir).named_modules())
    shapes = [layers[name.removeprefix("model.")].weight.shape for name in int8]  # plan names: the captured wrapper's
    # each int8 layer: 8 bits a weight and an fp32 scale per row, in place of 5 bits a weight
    grown = sum(rows * (cols * (8 - 5) / 8 + 4) for rows, cols in shapes)
    [default] = read_manifest(mnn_export[2])["artifacts"]
    assert grown > 0 and abs(artifact["bytes"] - default["bytes"] - grown) <= 0.1 * grown + 512, (
        artifact["bytes"], default["bytes"], grown)
