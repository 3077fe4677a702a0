"""Mixed precision: the per-layer QuantSpec, the encoder plan, and the CLI around them."""

from __future__ import annotations

import copy

import pytest
import torch

from edgepack.exporters.executorch.lower import quantize_module
from edgepack.exporters.mixed_precision import INT8
from edgepack.packaging.manifest import read_manifest
from edgepack.quant import QuantSpec
from tests.conftest import run_cli


def test_mixed_precision_is_refused_where_it_cannot_apply(llama_dir, bert_dir, tmp_path):
    result = run_cli("export", llama_dir, "--mixed-precision", "auto", "--quant", "int8", "--out", tmp_path)
    assert result.exit_code == 2 and "applies to models with a tokenizer at --quant int4" in result.stderr and "int8" in result.stderr
    result = run_cli("export", bert_dir, "--quant", "int8", "--calibration", __file__, "--out", tmp_path)
    assert result.exit_code == 2 and "--calibration applies to models with a tokenizer at --quant int4" in result.stderr
    result = run_cli("export", bert_dir, "--bits-per-weight", "5", "--out", tmp_path)
    assert result.exit_code == 2 and "--bits-per-weight applies to decoder LMs" in result.stderr
    result = run_cli("export", bert_dir, "--mixed-precision", "some", "--out", tmp_path)
    assert result.exit_code == 2 and "auto, off" in result.stderr
    result = run_cli("export", bert_dir, "--calibration", tmp_path / "nope.txt", "--out", tmp_path)
    assert result.exit_code == 2 and "no such file" in result.stderr
    # an encoder's calibration text only plans (a decoder LM's also fits its blocks, plan or no plan)
    result = run_cli("export", bert_dir, "--calibration", __file__, "--mixed-precision", "off", "--out", tmp_path)
    assert result.exit_code == 2 and "--calibration plans mixed precision, and --mixed-precision off turns it off" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


# make test-extended (CI's 45-minute budget): the encoder plan's artifacts on every backend are the
# real MiniLM's shared export in make test (tests/e2e/test_encoders.py, test_coreml.py, test_onnx.py).
@pytest.mark.extended
def test_export_records_the_plan_and_off_turns_it_off(bert_dir, tiny_bert_capture, tmp_path):
    """One plan for every backend: ExecuTorch (torchao, one pass per storage kind) stores each
    layer as planned and its .pte follows its reference on the ExecuTorch runtime. On the
    symmetric grid, whose lowering takes half the offset grid's (test_other_sources exports BERT
    on the offset grid)."""
    result = run_cli("export", bert_dir, "--target", "executorch,onnx", "--executorch-grid", "symmetric", "--pooling", "mean",
                     "--min-cosine", "0.998", "--out", tmp_path / "auto")
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(tmp_path / "auto" / "tiny-bert")
    quant = manifest["quantization"]
    assert quant["overrides"] and quant["plan"]["floor"] == 0.998 and quant["plan"]["floor_met"]
    assert "precision:" in result.stderr and "kept int8" in result.stderr
    spec = QuantSpec.from_options("int4").with_overrides({n: INT8 for n in quant["overrides"]}, plan={})
    module = quantize_module(copy.deepcopy(tiny_bert_capture.module), spec)
    for name, wq in spec.layers(module).items():
        weight = module.get_submodule(name).weight
        assert weight.target_dtype == getattr(torch, f"int{wq.bits}"), name
        assert weight.block_size == (1, wq.group_size or weight.shape[1]), name
    for backend in ("executorch", "onnx"):
        fidelity = manifest["comparisons"]["lowering_fidelity"][backend]
        assert fidelity["passed"] and all(c["min_cosine"] >= 0.999 for c in fidelity["cases"].values()), fidelity
    result = run_cli("export", bert_dir, "--target", "onnx", "--pooling", "mean", "--min-cosine", "0.998",
                     "--mixed-precision", "off", "--out", tmp_path / "off")
    assert result.exit_code == 1 and "< --min-cosine 0.998" in result.stderr  # all-int4 misses the floor
    assert not (tmp_path / "off" / "tiny-bert").exists()  # a failed export is kept aside, never as the bundle
    quant = read_manifest(tmp_path / "off" / "tiny-bert.failed")["quantization"]
    assert "overrides" not in quant and "plan" not in quant

