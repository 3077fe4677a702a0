"""Tokenizer facts and fidelity: the on-device runner's tokenizer is checked against the model's,
the chat template is rendered into a golden example, and a mismatch warns (or fails with --strict)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import export_json, files_under, run_cli


@pytest.fixture
def lowercasing_llama(llama_dir, tmp_path):
    """The tiny Llama with a Lowercase normalizer: HF tokenizers apply it, ExecuTorch's runner
    tokenizer cannot load it (an uncased tokenizer would ship broken to the phone)."""
    model = tmp_path / "lowercasing-llama"
    shutil.copytree(llama_dir, model)
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Lowercase"}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    return model


def test_mismatched_runner_tokenizer_fails_under_strict_before_any_work(lowercasing_llama, tmp_path):
    out = tmp_path / "out"
    result = run_cli("export", lowercasing_llama, "--strict", "--out", out)
    assert result.exit_code == 1, result.output
    assert "runner's tokenizer" in result.stderr and "Lowercase" in result.stderr
    assert files_under(out) == []


@pytest.mark.slow
def test_mismatched_runner_tokenizer_is_a_warning_in_the_summary_and_manifest(lowercasing_llama, tmp_path):
    # ONNX: the fastest target; the check runs before any backend and is the same for all of them
    code, summary = export_json(str(lowercasing_llama), "--target", "onnx", "--out", str(tmp_path))
    assert code == 0, summary
    [warning] = summary["warnings"]
    assert "cannot load tokenizer.json" in warning and "Lowercase" in warning
    manifest = json.loads((tmp_path / "lowercasing-llama" / "manifest.json").read_text())
    check = manifest["tokenizer"]["runner_check"]
    assert check["passed"] is False and check["mismatches"][0]["what"] == "load"

