"""`edgepack diff` on real bundles: the tiny Llama exported to GGUF (the quickest backend to
lower and run), and the same model with its weights perturbed. Every compared number is checked
against the two manifests; bounds fail the run (exit 1) only when NEW breaks them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from edgepack.packaging.manifest import read_manifest
from tests.conftest import REPO_ROOT, run_cli

pytestmark = pytest.mark.slow

# the text the tiny model was fitted on: perturbing its weights raises its perplexity there for sure
CORPUS = REPO_ROOT / "demo_model" / "corpus.txt"


def _export(model, out):
    result = run_cli("export", model, "--target", "gguf", "--mixed-precision", "off", "--eval-text", CORPUS, "--out", out)
    assert result.exit_code == 0, result.stderr[-3000:]
    return out / model.name


@pytest.fixture(scope="module")
def bundles(llama_dir, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("diff")
    perturbed = root / "tiny-llama"
    shutil.copytree(llama_dir, perturbed)
    weights = load_file(str(perturbed / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        if name.endswith("proj.weight"):
            weights[name] = w + 0.5 * w.std() * torch.randn(w.shape, generator=generator)
    save_file(weights, str(perturbed / "model.safetensors"), metadata={"format": "pt"})
    return _export(llama_dir, root / "old"), _export(perturbed, root / "new")


def _diff(*args):
    result = run_cli("diff", *args, "--json")
    return result.exit_code, json.loads(result.stdout)


def _change(report, what, backend=None):
    [change] = [c for c in report["changes"] if c["what"] == what and c["backend"] == backend]
    return change


def test_a_bundle_against_itself_is_unchanged(bundles):
    old, _ = bundles
    code, report = _diff(old, old, "--max-size-increase", "0", "--max-ppl-increase", "0")
    assert code == 0 and report["passed"] and not report["regressions"]
    assert all(c["same"] for c in report["changes"]), [c for c in report["changes"] if not c["same"]]
    assert {c["what"] for c in report["changes"]} >= {"bytes", "perplexity", "golden tokens", "toolchain", "quantization"}


def test_a_perturbed_model_fails_the_perplexity_bound(bundles):
    old, new = bundles
    a, b = read_manifest(old), read_manifest(new)
    ppl_a, ppl_b = a["quality"]["artifacts"]["gguf"]["perplexity"], b["quality"]["artifacts"]["gguf"]["perplexity"]
    rise = (ppl_b - ppl_a) / ppl_a * 100
    assert rise > 1, (ppl_a, ppl_b)
    code, report = _diff(old, new, "--max-ppl-increase", "1")
    assert code == 1 and not report["passed"]
    ppl = _change(report, "perplexity", "gguf")
    assert (ppl["old"], ppl["new"]) == (ppl_a, ppl_b) and ppl["change_pct"] == round(rise, 2)
    assert report["regressions"] == [f"gguf: perplexity {rise:+.2f} %, over --max-ppl-increase 1"]
    assert not _change(report, "source weights")["same"]
    assert _change(report, "bytes", "gguf")["change_pct"] == 0.0  # same shapes, same types
    for tokens in (_change(report, "golden tokens", "gguf"), _change(report, "fp32 golden tokens")):
        assert not tokens["same"] and tokens["note"].startswith("greedy: differ from step"), tokens
    # a bound NEW keeps passes: sizes did not grow
    code, report = _diff(old, new, "--max-size-increase", "0")
    assert code == 0 and report["passed"]
    # human output names the regression
    shown = " ".join(run_cli("diff", old, new, "--max-ppl-increase", "1").stderr.split())
    assert f"regression: gguf: perplexity {rise:+.2f} %, over --max-ppl-increase 1" in shown and "over bounds" in shown


def test_a_tampered_bundle_is_refused_not_compared(bundles, tmp_path):
    old, new = bundles
    tampered = tmp_path / "tampered"
    shutil.copytree(new, tampered)
    data = bytearray((tampered / "gguf" / "model.gguf").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "gguf" / "model.gguf").write_bytes(bytes(data))
    result = run_cli("diff", old, tampered)
    assert result.exit_code == 2 and "gguf/model.gguf" in result.stderr, result.stderr
