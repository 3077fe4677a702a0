"""Options no other test exports, exported through the CLI to every backend and smoked on each
artifact's runtime: --quant int8, a group size other than 32 (with CoreML at its fp16 default),
--pooling cls. Each run checks what the artifacts store, not only that they ran. Marked extended
(`make test-extended`): three exports to every backend took 9 minutes of CI's 45-minute budget."""

from __future__ import annotations

import json

import pytest

from edgepack.packaging.bundle import read_bundle
from tests.conftest import export_json, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.extended]
BACKENDS = ["coreml", "executorch", "gguf", "mnn", "onnx", "tflite"]


def _export(source, tmp_path, *args, skipped: tuple[str, ...] = ()) -> dict:
    code, summary = export_json(str(source), "--target", "all", *args, "--out", str(tmp_path))
    assert code == 0, json.dumps({k: summary[k] for k in ("failures", "quality_failures", "warnings")}, indent=1)
    manifest = read_bundle(tmp_path / summary["bundle"].rsplit("/", 1)[-1])  # every file checked against the index
    assert sorted(a["backend"] for a in manifest["artifacts"]) == [b for b in BACKENDS if b not in skipped]
    assert [s.split(":")[0] for s in manifest["verdict"]["skipped"]] == list(skipped)
    assert run_cli("smoke", summary["bundle"]).exit_code == 0  # and again from the written bundle
    return manifest


def test_int8_per_channel_decoder_on_every_backend(llama_dir, tmp_path):
    manifest = _export(llama_dir, tmp_path, "--quant", "int8", "--coreml-precision", "fp32")
    assert manifest["quantization"]["linear"] == "int8 per-channel sym"
    params = manifest["model"]["parameter_count"]
    for a in manifest["artifacts"]:
        # 8 bits a weight: about a quarter of fp32's 4 bytes, well over int4's half byte
        assert 0.8 * params < a["bytes"] < 3.0 * params, (a["backend"], a["bytes"])
        fidelity = manifest["comparisons"]["lowering_fidelity"][a["backend"]]
        assert fidelity["passed"] and fidelity["cases"]["greedy"]["steps_verified"] == 16
        text = manifest["quality"]["artifacts"][a["backend"]]
        # int8 barely moves a model: within 2 % of fp32's perplexity on the text
        assert text["passed"] and abs(text["increase_pct"]) < 2.0, (a["backend"], text)


def test_group_size_64_with_coreml_at_its_fp16_default(llama_dir, tmp_path):
    manifest = _export(llama_dir, tmp_path, "--group-size", "64", skipped=("gguf",))
    assert manifest["quantization"]["linear"] == "int4 g64 sym"
    by_backend = {a["backend"]: a for a in manifest["artifacts"]}
    assert by_backend["coreml"]["runtime"]["compute_precision"] == "fp16"
    for backend, a in by_backend.items():
        assert "g64" in json.dumps(a["quantization"]) or "block_size=64" in json.dumps(a["quantization"]), backend
        assert manifest["comparisons"]["lowering_fidelity"][backend]["passed"]
        assert manifest["quality"]["artifacts"][backend]["non_finite_steps"] == 0


def test_cls_pooled_encoder_on_every_backend(bert_dir, tmp_path):
    manifest = _export(bert_dir, tmp_path, "--pooling", "cls", "--mixed-precision", "off", skipped=("gguf",))
    for a in manifest["artifacts"]:
        [method] = a["methods"]
        # litert_torch names a signature's tensor output output_0; the others carry the pooled name
        assert method["outputs"][0]["name"] == ("output_0" if a["backend"] == "tflite" else "sentence_embedding")
        assert method["outputs"][0]["shape"] == [1, 64]
        cases = manifest["comparisons"]["lowering_fidelity"][a["backend"]]["cases"]
        assert len(cases) == 3 and all(c["min_cosine"] >= 0.99 and not c["failures"] for c in cases.values())
        # the artifact against fp32: int4 moved it, and not far
        assert all(0.9 < c["vs_fp32"]["min_cosine"] < 0.99999 for c in cases.values()), (a["backend"], cases)
