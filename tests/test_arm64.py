"""`edgepack smoke --on arm64-emulated`: the tiny Llama's TFLite (and ONNX) artifacts on the arm64
builds of LiteRT and ONNX Runtime under qemu, judged on the host with the host's comparison code.

The emulated environment is set up by the same code as `make arm64-env` (cached under build/arm64;
a fresh machine fetches it once, ~1 min). Skipped only when this machine has no apt or no network
to fetch it: every other set-up failure fails the tests."""

from __future__ import annotations

import json
import shutil

import pytest

from edgepack.packaging.arm64_env import EXIT_NO_ARM64_ENV, Arm64SetupError, load_env, set_up
from edgepack.errors import EdgepackError
from tests.conftest import export_json, flip, resign, run_cli

_NETWORK_FAILURES = ("Temporary failure resolving", "Could not resolve", "Failed to fetch", "Name or service not known",
                     "Network is unreachable", "NewConnectionError")


@pytest.fixture(scope="session")
def arm64_env():
    try:
        return load_env()
    except EdgepackError:
        pass
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        pytest.skip("no apt-get/dpkg here to fetch the arm64 environment (make arm64-env needs Debian or Ubuntu)")
    try:
        return set_up(say=lambda _: None)
    except Arm64SetupError as e:
        if any(s in e.message for s in _NETWORK_FAILURES):
            pytest.skip(f"no network to fetch the arm64 environment: {e.message[-300:]}")
        raise


@pytest.fixture(scope="session")
def arm64_bundle(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-arm64")
    code, summary = export_json(str(llama_dir), "--target", "tflite,onnx", "--prefill-len", "8", "--out", str(out))
    return code, summary, out / "tiny-llama"


def _smoke(bundle, *args):
    result = run_cli("smoke", bundle, "--on", "arm64-emulated", "--json", *args)
    return result, json.loads(result.stdout)


@pytest.mark.slow
def test_tflite_passes_token_for_token_on_arm64(arm64_env, arm64_bundle):
    code, summary, bundle = arm64_bundle
    assert "tflite" in [a["backend"] for a in summary["artifacts"]], summary
    result, report = _smoke(bundle, "--backend", "tflite")
    assert result.exit_code == 0, result.output
    tflite = report["results"]["tflite"]
    assert tflite["runtime"] == "tflite arm64-emulated" and tflite["passed"] and tflite["error"] is None
    greedy = tflite["cases"]["greedy"]
    assert greedy["tokens_match"] and greedy["min_cosine"] >= 0.99 and not greedy["failures"]
    # The same .tflite on the same LiteRT version, arm64 kernels vs x86 kernels.
    assert greedy["vs_x86"]["tokens_match"] and greedy["vs_x86"]["max_abs_diff"] < 1e-3


@pytest.mark.slow
def test_onnx_passes_on_arm64(arm64_env, arm64_bundle):
    if "onnxruntime" not in arm64_env.packages:
        pytest.skip(f"onnxruntime has no aarch64 wheel here: {arm64_env.unavailable.get('onnxruntime')}")
    result, report = _smoke(arm64_bundle[2], "--backend", "onnx")
    assert result.exit_code == 0, result.output
    greedy = report["results"]["onnx"]["cases"]["greedy"]
    assert greedy["tokens_match"] and greedy["vs_x86"]["tokens_match"], greedy


@pytest.mark.slow
def test_a_broken_artifact_fails_on_arm64(arm64_env, arm64_bundle, tmp_path):
    """4 KiB of the .tflite's weights inverted, the bundle's index rewritten to match: only the
    numbers can tell, and the emulated arm64 run must."""
    bundle = shutil.copytree(arm64_bundle[2], tmp_path / "tiny-llama")
    model = bundle / "tflite" / "model.tflite"
    flip(model, model.stat().st_size // 2 - 2048, 4096)
    resign(bundle)
    result, report = _smoke(bundle, "--backend", "tflite")
    assert result.exit_code == 1, result.output
    verdict = report["results"]["tflite"]
    assert not report["ok"] and not verdict["passed"] and (verdict["error"] or verdict["cases"]["greedy"]["failures"])


@pytest.mark.slow
def test_missing_env_exits_with_its_own_code(arm64_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_ARM64_ENV", str(tmp_path / "nothing-here"))
    result = run_cli("smoke", arm64_bundle[2], "--on", "arm64-emulated")
    assert result.exit_code == EXIT_NO_ARM64_ENV == 3
    assert "make arm64-env" in result.stderr and "pass" not in result.stderr


def test_unknown_place_lists_the_choices(tmp_path):
    result = run_cli("smoke", tmp_path, "--on", "pixel-9")
    assert result.exit_code == 2
    assert "host" in result.stderr and "arm64-emulated" in result.stderr
