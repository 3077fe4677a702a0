"""The decoder LM precision plan through the CLI: recorded in the manifest, stored by the artifact,
one plan per int4 grid when backends store different grids (the plan itself: tests/unit/test_decoder_plan.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import gguf
import numpy as np
import onnx
import pytest
import torch

from edgepack.packaging.bundle import read_bundle
from tests.conftest import REPO_ROOT, export_json, offset_grid_weights, run_cli


@pytest.mark.slow
@pytest.mark.extended  # CI's 45-minute budget (the clean-clone run on an AMD EPYC host, 2026-12-02)
def test_export_records_the_plan_and_the_artifact_stores_it(llama_dir, tmp_path):
    code, summary = export_json(str(llama_dir), "--target", "onnx", "--bits-per-weight", "5.5", "--out", str(tmp_path / "auto"))
    assert code == 0, json.dumps(summary["failures"])
    manifest = read_bundle(tmp_path / "auto" / "tiny-llama")
    plan, overrides = manifest["quantization"]["plan"], manifest["quantization"]["overrides"]
    assert plan["budget_bits_per_weight"] == 5.5 and plan["bits_per_weight"] <= 5.5
    assert sorted(overrides) == plan["int8_layer_names"] and set(overrides.values()) == {"int8 per-channel sym"}
    [artifact] = manifest["artifacts"]
    assert artifact["quantization"]["overrides"] == overrides
    # the graph stores an 8-bit MatMulNBits for each input the plan's int8 linear layers read (q, k
    # and v, or gate and up, at one precision are stacked into one)
    graph = onnx.load(tmp_path / "auto" / "tiny-llama" / artifact["path"]).graph
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"]
    inputs = {re.sub(r"\.(q|k|v)_proj$", ".qkv", re.sub(r"\.(gate|up)_proj$", ".gate_up", name)) for name in overrides}
    assert bits.count(8) == len(inputs) and bits.count(4) > 0
    assert manifest["comparisons"]["lowering_fidelity"]["onnx"]["cases"]["greedy"]["steps_verified"] == 16
    # the same plan and bytes from a process of its own, with another hash seed and one thread
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "edgepack", "export", str(llama_dir), "--target", "onnx", "--bits-per-weight", "5.5",
                    "--out", str(tmp_path / "again")], env=env, check=True, capture_output=True)
    again = read_bundle(tmp_path / "again" / "tiny-llama")
    assert again["quantization"] == manifest["quantization"] and again["artifacts"][0]["sha256"] == artifact["sha256"]


@pytest.mark.slow
def test_backends_on_two_grids_get_a_plan_each(llama_dir, tmp_path):
    """GGUF's Q4_1 (offset grid, 5 bits a weight) and ONNX on the symmetric grid (4.5) in one
    export: one plan per grid from the same gradients, each artifact stores its own, the manifest
    and the summary say which backends follow which. 4.75 bits buys the symmetric grid some int8
    layers; the offset grid stays all int4, over the budget, and the export says so."""
    result = run_cli("export", llama_dir, "--target", "gguf,onnx", "--onnx-grid", "symmetric", "--bits-per-weight", "4.75",
                     "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    manifest = read_bundle(tmp_path / "tiny-llama")
    quant = manifest["quantization"]
    assert "plan" not in quant and sorted(quant["plans"]) == ["offset", "symmetric"]
    offset, symmetric = quant["plans"]["offset"], quant["plans"]["symmetric"]
    assert offset["backends"] == ["gguf"] and symmetric["backends"] == ["onnx"]
    assert "overrides" not in offset and offset["plan"]["bits_per_weight"] == pytest.approx(5.0, abs=1e-4)
    assert symmetric["overrides"] and 4.5 < symmetric["plan"]["bits_per_weight"] <= 4.75
    assert sorted(symmetric["overrides"]) == symmetric["plan"]["int8_layer_names"]
    arts = {a["backend"]: a["quantization"] for a in manifest["artifacts"]}
    assert "overrides" not in arts["gguf"] and "Q8_0" not in arts["gguf"]["gguf_types"]
    assert arts["onnx"]["overrides"] == symmetric["overrides"]
    stderr = " ".join(result.stderr.split())
    assert "precision: gguf: 0 of" in stderr and "precision: onnx: " in stderr
    assert "gguf: the offset grid stores int4 at 5 bits a weight, over --bits-per-weight 4.75" in stderr
    # the offset grid's blocks are fitted to the calibration text in place: ONNX's symmetric grid
    # is lowered from the float weights before that, and fp32's perplexity measured; GGUF after
    assert quant["block_fit"]["backends"] == ["gguf"] and "block_fit" not in offset["plan"]
    assert [a["backend"] for a in manifest["artifacts"]] == ["gguf", "onnx"]
    stages = [re.search(rf"✓ {name} \d", stderr).start() for name in ("lower onnx", "quality fp32", "fit offset grid",
                                                                         "lower gguf", "quality")]
    assert stages == sorted(stages), stderr
    # what GGUF stores is the fit (weights.fit_min_max_, weighted by each layer's inputs on the
    # built-in calibration texts), which the float weights' own min..max is not
    from safetensors.torch import load_file

    from edgepack.exporters.weights import quantize_min_max

    fitted = torch.from_numpy(offset_grid_weights(llama_dir)["model.layers.1.mlp.down_proj.weight"])
    weight = load_file(str(llama_dir / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"].float()
    q, scale, minimum = quantize_min_max(weight, 4, 32, scale_dtype=torch.float16)
    plain = (q * scale + minimum.half().float()).reshape(weight.shape)
    reader = gguf.GGUFReader(tmp_path / "tiny-llama" / "gguf" / "model.gguf")
    [tensor] = [t for t in reader.tensors if t.name == "blk.1.ffn_down.weight"]
    stored = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)).reshape(fitted.shape)
    assert torch.allclose(stored, fitted, atol=1e-6, rtol=0)
    assert (stored - plain).abs().max() > 1e-3



@pytest.mark.slow
def test_the_fit_needs_no_plan_and_reads_the_given_calibration_text(llama_dir, tmp_path):
    """--mixed-precision off keeps every layer int4 and still fits the offset grid's blocks, to the
    texts --calibration gives: what GGUF stores is that fit, not the built-in texts' one."""
    calibration = REPO_ROOT / "demo_model" / "corpus.txt"
    code, summary = export_json(str(llama_dir), "--target", "gguf", "--mixed-precision", "off", "--calibration",
                                str(calibration), "--out", str(tmp_path))
    assert code == 0, json.dumps(summary["failures"])
    quant = read_bundle(tmp_path / "tiny-llama")["quantization"]
    assert "plan" not in quant and "overrides" not in quant and quant["block_fit"]["backends"] == ["gguf"]
    reader = gguf.GGUFReader(tmp_path / "tiny-llama" / "gguf" / "model.gguf")
    [tensor] = [t for t in reader.tensors if t.name == "blk.0.ffn_down.weight"]  # (q and k rows are permuted)
    stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    given, built_in = (offset_grid_weights(llama_dir, texts)["model.layers.0.mlp.down_proj.weight"]
                       for texts in (calibration, None))
    assert np.allclose(stored.reshape(given.shape), given, atol=1e-6, rtol=0)
    assert np.abs(given - built_in).max() > 1e-3
