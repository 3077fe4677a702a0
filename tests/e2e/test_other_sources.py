"""The other front ends: a BERT encoder directory, a Python factory and a saved .pt2 program,
each exported to ExecuTorch and checked on the ExecuTorch runtime; a hub id read from a local
Hugging Face cache laid out on disk (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from edgepack.packaging.manifest import read_manifest
from tests.conftest import REPO_ROOT, export_json

pytestmark = pytest.mark.slow


def _check(out, name, code, summary):
    assert code == 0, summary
    manifest = read_manifest(out / name)
    fidelity = manifest["comparisons"]["lowering_fidelity"]["executorch"]
    assert fidelity["passed"], fidelity
    return manifest


@pytest.mark.extended  # CI's 45-minute budget (the clean-clone run on an AMD EPYC host, 2026-12-02)
def test_bert_encoder_exports_with_4bit_weights(bert_dir, tmp_path):
    # The symmetric grid lowers in half the offset grid's time (CI's budget); an encoder on the
    # offset grid is the real MiniLM's shared export (tests/e2e/test_encoders.py).
    code, summary = export_json(str(bert_dir), "--executorch-grid", "symmetric", "--out", str(tmp_path))
    manifest = _check(tmp_path, "tiny-bert", code, summary)
    assert manifest["model"]["task"] == "encoder" and manifest["generation"] is None
    cases = manifest["comparisons"]["lowering_fidelity"]["executorch"]["cases"]
    assert len(cases) == 3 and all(c["min_cosine"] >= 0.99 for c in cases.values())
    [method] = manifest["artifacts"][0]["methods"]
    assert [i["name"] for i in method["inputs"]] == ["input_ids", "attention_mask"]
    assert method["inputs"][0]["shape"] == [1, "seq_len"]
    # the artifact against fp32 on its runtime: int4 costs the tiny random BERT a little, not more
    vs_fp32 = [c["vs_fp32"]["min_cosine"] for c in cases.values()]
    assert all(0.95 <= c < 0.99999 for c in vs_fp32), vs_fp32


def test_factory_module(tmp_path):
    source = f"{REPO_ROOT / 'tests/fixtures/mlp_factory.py'}:build"
    code, summary = export_json(source, "--out", str(tmp_path), "--no-tokenizer")
    manifest = _check(tmp_path, "mlp_factory", code, summary)
    assert manifest["model"]["source_kind"] == "factory" and manifest["tokenizer"] is None
    [method] = manifest["artifacts"][0]["methods"]
    assert method["inputs"][0]["shape"] == [4, 64] and method["outputs"][0]["shape"] == [4, 32]
    # 64*128 + 128*32 weights at 5 bits (ExecuTorch's default offset grid: 4 bits, a 16-bit scale
    # and a 16-bit offset per 32), biases fp32
    assert manifest["artifacts"][0]["ideal_bytes"] == int((64 * 128 + 128 * 32) * 5.0 / 8 + (128 + 32) * 4)


def test_saved_exported_program(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 32),)), path)
    code, summary = export_json(str(path), "--out", str(tmp_path / "out"))
    manifest = _check(tmp_path / "out", "mlp", code, summary)
    assert manifest["model"]["source_kind"] == "pt2"
    assert manifest["model"]["weight_files"][0]["name"] == "mlp.pt2"


def _cli(*args, cache) -> subprocess.CompletedProcess:
    """The CLI in its own process, as a user runs it: huggingface_hub reads HF_HUB_CACHE when imported."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "edgepack", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_hub_id_is_read_from_the_local_cache(llama_dir, tmp_path):
    """ORG/NAME resolves through the cache's refs/main to its snapshot, as transformers resolves it;
    the manifest records the repo, the revision and the commit, and the weights read are the cache's."""
    commit = hashlib.sha1(b"tiny-llama v1").hexdigest()
    repo = tmp_path / "hub" / "models--local--tiny-llama"
    shutil.copytree(llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = _cli("export", "local/tiny-llama", "--target", "gguf", "--out", tmp_path / "out", "--json", cache=tmp_path / "hub")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "out" / "tiny-llama")
    model = manifest["model"]
    assert model["source"] == "local/tiny-llama" and model["source_kind"] == "hub"
    assert model["hub"] == {"repo_id": "local/tiny-llama", "revision": "main", "commit": commit}
    want = hashlib.sha256((llama_dir / "model.safetensors").read_bytes()).hexdigest()
    assert model["weight_files"] == [{"name": "model.safetensors", "sha256": want}]
    assert manifest["comparisons"]["lowering_fidelity"]["gguf"]["passed"]
    assert json.loads(result.stdout)["ok"] is True


def test_a_hub_id_not_in_the_cache_says_where_edgepack_looked(tmp_path):
    (tmp_path / "hub").mkdir()
    for source, revision in (("local/absent", "main"), ("local/absent@v2", "v2")):
        result = _cli("export", source, "--target", "gguf", "--out", tmp_path / "out", cache=tmp_path / "hub")
        assert result.returncode == 2, result.stderr[-2000:]
        said = " ".join(result.stderr.split())
        assert f"local/absent at '{revision}' is not in the Hugging Face cache {tmp_path / 'hub'}" in said, said
        assert "edgepack never downloads" in said and "hf download local/absent" in said
    assert not (tmp_path / "out").exists()
