"""The verdict is the product: a bundle that does not match its manifest is refused, a broken
artifact fails its smoke, a failed export never replaces a good bundle, a full disk loses nothing,
and the exit code says what happened (issue 20)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.packaging.manifest import dumps
from tests.conftest import LLAMA_BACKEND_OPTIONS, REPO_ROOT, flip, resign, run_cli

BACKEND_EXPORTS = {"executorch": "llama_export", "onnx": "onnx_export", "tflite": "tflite_export", "coreml": "coreml_llama",
                   "mnn": "mnn_export"}
# The file of each artifact that holds its weights.
WEIGHTS_FILE = {"executorch": "executorch/model.pte", "onnx": "onnx/model.onnx", "tflite": "tflite/model.tflite",
                "coreml": "coreml/model.mlpackage/Data/com.apple.CoreML/weights/weight.bin", "mnn": "mnn/model.mnn"}
DEMO_CORPUS = REPO_ROOT / "demo_model" / "corpus.txt"


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bundle(request, backend: str, tmp_path: Path) -> Path:
    """A private copy of the shared tiny-Llama bundle of `backend`."""
    code, _, shared = request.getfixturevalue(BACKEND_EXPORTS[backend])
    assert code == 0
    return Path(shutil.copytree(shared, tmp_path / "tiny-llama"))


@pytest.mark.parametrize("backend", BACKEND_EXPORTS)
def test_one_flipped_byte_is_refused_by_smoke_and_inspect(backend, request, tmp_path):
    bundle = _bundle(request, backend, tmp_path)
    weights = bundle / WEIGHTS_FILE[backend]
    flip(weights, weights.stat().st_size // 2)
    for command in ("smoke", "inspect"):
        result = run_cli(command, bundle)
        assert result.exit_code == 2, result.output
        assert f"{WEIGHTS_FILE[backend]} does not match the manifest" in result.stderr
        assert "restore the bundle from its archive or re-export" in result.stderr


@pytest.mark.parametrize("backend", BACKEND_EXPORTS)
def test_a_broken_artifact_fails_its_smoke_even_when_its_manifest_is_resigned(backend, request, tmp_path):
    """Break the artifact itself (4 KiB of its weights inverted), not the expected outputs."""
    bundle = _bundle(request, backend, tmp_path)
    weights = bundle / WEIGHTS_FILE[backend]
    flip(weights, weights.stat().st_size // 2 - 2048, 4096)
    resign(bundle)
    assert run_cli("inspect", bundle).exit_code == 0  # the bundle is consistent: only its numbers are wrong
    result = run_cli("smoke", bundle, "--json")
    assert result.exit_code == 1, result.output
    verdict = json.loads(result.stdout)["results"][backend]
    assert not verdict["passed"] and (verdict["error"] or verdict["cases"]["greedy"]["failures"])


# ONNX's re-export (~30 s in CI) runs in make test; the others (MNN ~57 s, ExecuTorch ~75 s, TFLite ~45 s,
# CoreML ~2.5 min on one thread) in make test-extended, for CI's 45-minute budget (the clean-clone run of
# c0243b5 took 2,625 s of the 2,700 here, so MNN's moved out).
@pytest.mark.parametrize("backend", [b if b == "onnx" else pytest.param(b, marks=pytest.mark.extended)
                                     for b in BACKEND_EXPORTS])
def test_identical_bytes_across_processes_hash_seeds_and_thread_counts(backend, request, llama_dir, tmp_path):
    """The shared export ran in the test process (a random hash seed, the default thread count);
    this one runs in a process of its own with another seed and one thread everywhere. Every
    file of the bundle, the manifest and the archive included, must be the same bytes."""
    _, _, shared = request.getfixturevalue(BACKEND_EXPORTS[backend])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "edgepack", "export", str(llama_dir), "--target", backend,
                    *LLAMA_BACKEND_OPTIONS[backend], "--out", str(tmp_path)], env=env, check=True, capture_output=True)
    again = _digests(tmp_path / "tiny-llama")
    assert again == _digests(shared), sorted(k for k in again if again[k] != _digests(shared).get(k))


def test_tokenizer_edits_deleted_artifacts_stray_files_and_escaping_paths_are_refused(request, tmp_path):
    bundle = _bundle(request, "onnx", tmp_path)
    pristine = tmp_path / "pristine"
    shutil.copytree(bundle, pristine)

    def fresh() -> Path:
        shutil.rmtree(bundle)
        shutil.copytree(pristine, bundle)
        return bundle

    tok = fresh() / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|eot_id|>"', '"<|eot|>"'))
    assert "tokenizer/tokenizer.json does not match the manifest" in run_cli("smoke", bundle).stderr

    (fresh() / "onnx" / "model.onnx").unlink()
    result = run_cli("inspect", bundle)
    assert result.exit_code == 2 and "onnx/model.onnx is missing" in result.stderr

    (fresh() / "onnx" / "extra.bin").write_bytes(b"x")
    result = run_cli("smoke", bundle)
    assert result.exit_code == 2 and "1 file(s) the manifest does not list: onnx/extra.bin" in result.stderr

    outside = tmp_path / "outside"
    outside.mkdir()
    manifest = json.loads((fresh() / "manifest.json").read_text())
    manifest["artifacts"][0]["path"] = "../outside/model.onnx"
    (bundle / "manifest.json").write_bytes(dumps(manifest))
    result = run_cli("smoke", bundle)
    assert result.exit_code == 2 and "outside" in result.stderr and "a bug" not in result.stderr

    link = fresh() / "tokenizer" / "tokenizer.json"
    shutil.copy(link, outside / "tokenizer.json")
    link.unlink()
    link.symlink_to(outside / "tokenizer.json")
    result = run_cli("smoke", bundle)
    assert result.exit_code == 2 and "leads outside the bundle" in result.stderr

    assert run_cli("smoke", fresh()).exit_code == 0  # the untouched copy passes


def _outlier_model(src: Path, dst: Path) -> Path:
    """The same model with one hidden dimension per group of 32 silenced in fp32 (its norm gain
    0) and given weights 100x the largest in the layers it feeds: fp32 barely changes, but any
    min/max 4-bit grid now spends its range on those weights and rounds the rest of each group to
    zero. A model that quantizes this badly must fail the export."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for name, t in tensors.items():
        t = t.clone()
        if name.endswith("layernorm.weight"):
            t[::32] = 0
        elif name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            t[:, ::32] = 100 * t.abs().max()
        tensors[name] = t
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_quantization_disaster_fails_by_default_and_the_earlier_bundle_survives(llama_dir, tmp_path):
    """The default gate (no option given) on perplexity, measured through the ONNX artifact on a
    text the tiny model was fitted to (so its fp32 perplexity means something)."""
    out = tmp_path / "out"
    args = ("--target", "onnx", "--eval-text", DEMO_CORPUS, "--name", "m", "--out", out, "--json")
    good = run_cli("export", llama_dir, *args)
    assert good.exit_code == 0, good.output
    before = _digests(out / "m")
    quality = json.loads(good.stdout)["artifacts"][0]["text_quality"]
    assert quality["passed"] and quality["increase_pct"] < 50 and quality["scored_tokens"] > 1000

    bad = run_cli("export", _outlier_model(llama_dir, tmp_path / "outliers"), *args)
    assert bad.exit_code == 1, bad.output
    summary = json.loads(bad.stdout)
    quality = summary["artifacts"][0]["text_quality"]
    assert not quality["passed"] and quality["increase_pct"] > 100, quality  # perplexity more than doubled
    assert "quality gate failed" in bad.stderr and "--max-ppl-increase" in bad.stderr
    assert _digests(out / "m") == before  # the earlier bundle, byte for byte
    failed = out / "m.failed"
    assert summary["bundle"] == str(failed) and not summary["bundle_passed"]
    assert f"kept for inspection in {failed}" in " ".join(bad.stderr.split())
    manifest = json.loads((failed / "manifest.json").read_text())
    # (On ONNX's offset grid these 100x outlier blocks also fail the smoke: the symmetric part and
    # the block offset are each ~50x the weights and cancel, so float rounding differs between
    # ONNX Runtime and the reference beyond its tolerance; docs/limits.md.)
    assert not manifest["verdict"]["passed"] and any("perplexity" in f for f in manifest["verdict"]["failures"])
    assert run_cli("inspect", failed).exit_code == 0  # a failed bundle is complete and consistent
    # a later good export replaces the bundle, and leaves the failed one for the user to remove
    again = run_cli("export", llama_dir, *args)
    assert again.exit_code == 0 and _digests(out / "m") == before and failed.is_dir()


def test_one_backend_failing_keeps_the_others_aside_and_strict_writes_nothing(llama_dir, tmp_path):
    # CoreML cannot store a stateful int4 model for iOS 17; ONNX exports fine.
    args = ("--target", "onnx,coreml", "--ios-target", "17", "--out", tmp_path, "--json")
    result = run_cli("export", llama_dir, *args)
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert [f["backend"] for f in summary["failures"]] == ["coreml"]
    assert [a["backend"] for a in summary["artifacts"]] == ["onnx"] and summary["artifacts"][0]["lowering_fidelity"]["passed"]
    assert not (tmp_path / "tiny-llama").exists() and (tmp_path / "tiny-llama.failed" / "onnx" / "model.onnx").is_file()
    # --strict stops at the first failure: here the iOS target the user chose (bad input, exit 2)
    strict = run_cli("export", llama_dir, *args, "--strict", "--name", "strict")
    assert strict.exit_code == 2 and "--ios-target 17" in strict.stderr, strict.output
    assert not any(p.name.startswith("strict") for p in tmp_path.iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_bundles_get_the_users_umask(umask, llama_dir, tmp_path):
    old = os.umask(umask)
    try:
        assert run_cli("export", llama_dir, "--target", "onnx", "--out", tmp_path).exit_code == 0
    finally:
        os.umask(old)
    bundle = tmp_path / "tiny-llama"
    modes = {p.relative_to(bundle).as_posix(): p.stat().st_mode & 0o777 for p in [bundle, *bundle.rglob("*")]}
    executable = {"smoke/run_android.sh", "smoke/run_ios.sh"}
    for path, mode in modes.items():
        want = 0o777 if (path == "." or (bundle / path).is_dir() or path in executable) else 0o666
        assert mode == want & ~umask, (path, oct(mode))


def test_a_full_disk_is_exit_4_and_loses_nothing(llama_dir, tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    # 600 KiB: room for the earlier bundle below (450 KB), not for a new one too (~0.3 MB with its archive)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"this machine cannot mount a small file system for the test: {done.stderr.strip()}")
    try:
        earlier = mount / "tiny-llama"
        earlier.mkdir()
        (earlier / "manifest.json").write_text('{"earlier": true}')
        (earlier / "payload.bin").write_bytes(os.urandom(450_000))
        before = _digests(mount)
        result = run_cli("export", llama_dir, "--target", "onnx", "--out", mount, "--json")
        assert result.exit_code == 4, result.output
        assert "no space left to write" in result.stderr and "a bug" not in result.stderr
        assert json.loads(result.stdout)["exit_code"] == 4
        assert _digests(mount) == before and sorted(p.name for p in mount.iterdir()) == ["tiny-llama"]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_every_lowering_leaves_the_capture_as_it_found_it(llama_dir):
    """`--target all` lowers every backend from one capture. A backend that left its weights
    written over (TFLite's offset grid holds W_sym in them for its reference) or its layers
    swapped would hand the next backend another model, and that backend's own reference would
    follow it and pass its smoke. After each lowering, in the order `--target all` runs them, every
    parameter of the capture is bit for bit what it was, held by the same kind of module."""
    import torch

    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.lowering import lower
    from edgepack.exporters.registry import BACKENDS
    from edgepack.exporters.sources import load_source
    from edgepack.quant import QuantSpec

    captured = capture(load_source(str(llama_dir)), CaptureOptions(max_seq_len=64))
    module = captured.module
    layers = [(name, type(m)) for name, m in module.named_modules()]
    weights = {name: p.detach().clone() for name, p in module.named_parameters(remove_duplicate=False)}
    spec = QuantSpec.from_options("int4")
    for backend in BACKENDS.values():
        lower(backend, captured, spec, backend.validated_options({"prefill_lens": (8,)} if backend.name == "tflite" else {}))
        assert [(name, type(m)) for name, m in module.named_modules()] == layers, backend.name
        changed = [name for name, p in module.named_parameters(remove_duplicate=False) if not torch.equal(p, weights[name])]
        assert not changed, (backend.name, changed)
