"""Every bad input gets a one-line reason naming the file or option, exit code 2, and leaves
nothing behind in the output directory."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import files_under, run_cli


def _assert_rejected(args, out, *needles):
    result = run_cli("export", *args, "--out", out, "--json")
    assert result.exit_code == 2, result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("error: ")]) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert json.loads(result.stdout)["exit_code"] == 2
    assert not any(not name.startswith(".") or "partial" in name for name in files_under(out)), files_under(out)


def test_missing_path(tmp_path):
    _assert_rejected([tmp_path / "nope"], tmp_path / "out", "nope", "no such model directory")


def test_directory_without_config(tmp_path):
    (tmp_path / "model").mkdir()
    _assert_rejected([tmp_path / "model"], tmp_path / "out", "config.json")


def test_unsupported_architecture(llama_dir, tmp_path):
    model = tmp_path / "mamba"
    shutil.copytree(llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "mamba"
    (model / "config.json").write_text(json.dumps(config))
    _assert_rejected([model], tmp_path / "out", "'mamba' is not supported", "supported model types: ", "llama")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_safetensors(llama_dir, tmp_path, damage):
    model = tmp_path / "broken"
    shutil.copytree(llama_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64)
    _assert_rejected([model], tmp_path / "out", "model.safetensors", "safetensors")


def test_pickle_weights_are_refused(llama_dir, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(llama_dir, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    _assert_rejected([model], tmp_path / "out", "no *.safetensors", "pytorch_model.bin", "never unpickles")


def test_unknown_target(llama_dir, tmp_path):
    _assert_rejected([llama_dir, "--target", "executorch,vulkan"], tmp_path / "out", "'vulkan'", "registered backends: executorch")


def test_output_directory_not_writable(llama_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli("export", llama_dir, "--out", blocker / "dist")
    assert result.exit_code == 2 and "--out" in result.stderr and "not a writable directory" in result.stderr
    assert blocker.read_text() == "not a directory"


def test_group_size_that_does_not_divide_the_layers(llama_dir, tmp_path):
    # the tiny Llama's hidden size is 64: groups of 128 cannot tile it
    _assert_rejected([llama_dir, "--group-size", "128"], tmp_path / "out", "--group-size 128", "does not divide")


def test_group_size_not_a_power_of_two(llama_dir, tmp_path):
    _assert_rejected([llama_dir, "--group-size", "24"], tmp_path / "out", "--group-size 24")


def test_unknown_quant_scheme(llama_dir, tmp_path):
    _assert_rejected([llama_dir, "--quant", "int3"], tmp_path / "out", "--quant 'int3'", "int4, int8, none")


def test_missing_tokenizer(llama_dir, tmp_path):
    model = tmp_path / "no-tok"
    shutil.copytree(llama_dir, model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    _assert_rejected([model], tmp_path / "out", "no tokenizer found", "--no-tokenizer")


def test_max_seq_len_beyond_the_model(llama_dir, tmp_path):
    _assert_rejected([llama_dir, "--max-seq-len", "100000"], tmp_path / "out", "--max-seq-len 100000")


def test_smoke_on_a_directory_that_is_not_a_bundle(tmp_path):
    result = run_cli("smoke", tmp_path)
    assert result.exit_code == 2 and "not an edgepack bundle" in result.stderr


def test_backend_options_without_their_backend(llama_dir, tmp_path):
    _assert_rejected([llama_dir, "--target", "executorch", "--ios-target", "17"], tmp_path / "out",
                     "coreml options (ios_target)", "--target does not include coreml")
