"""The GGUF backend on the real writer and quantizers (gguf, llama.cpp's own Python package) and
the real runtime (llama.cpp, built by llama-cpp-python): the file read back tensor by tensor, the
tokenizer llama.cpp reads from it, and the golden tokens and perplexity through llama.cpp."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from demo_model.build import LLAMA3_ROPE, PHI3_LONGROPE
from edgepack.exporters.gguf.vocab import GgufVocab, read_vocab, write_vocab
from edgepack.packaging.manifest import read_manifest
from tests.conftest import SHORT_EVAL_TEXT, export_json, offset_grid_weights, run_cli

pytestmark = pytest.mark.slow


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def _weights(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of the file: its GGUF type and its values as llama.cpp dequantizes them, [rows, cols]."""
    import gguf

    out = {}
    for t in _reader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = (t.tensor_type.name, values.reshape([int(d) for d in reversed(t.shape)]))
    return out


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved q/k rows back in Hugging Face's half-split order."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def gguf_export(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    # Q4_1 (the offset grid) takes 5 bits a weight: the default 5.0 keeps every layer int4, 5.5 buys some int8
    code, summary = export_json(str(llama_dir), "--target", "gguf", "--bits-per-weight", "5.5", "--out", str(out))
    return code, summary, out / "tiny-llama"


def test_llama_cpp_answers_like_the_stored_weights(gguf_export, llama_dir):
    code, summary, bundle = gguf_export
    assert code == 0, json.dumps(summary)[:3000]
    manifest = read_manifest(bundle)
    [artifact] = manifest["artifacts"]
    assert artifact["path"] == "gguf/model.gguf" and artifact["runtime"]["name"] == "llama.cpp"
    greedy = manifest["comparisons"]["lowering_fidelity"]["gguf"]["cases"]["greedy"]
    # llama.cpp quantizes activations per block of 32 and keeps an fp16 KV cache: the reference
    # (fp32 math on the stored weights) must still be matched at every step
    assert greedy["steps_verified"] == 16 and not greedy["failures"] and greedy["min_cosine"] >= 0.99, greedy
    text = manifest["quality"]["artifacts"]["gguf"]
    assert text["passed"] and text["non_finite_steps"] == 0 and text["scored_tokens"] > 1000, text
    # the plan's layers, each in its GGUF type: 4-bit ones Q4_1, the plan's int8 ones Q8_0
    plan = manifest["quantization"]["plan"]
    assert plan["grid"].startswith("offset") and 5.0 < plan["bits_per_weight"] <= 5.5
    types = artifact["quantization"]["gguf_types"]
    assert types["Q8_0"] == len(plan["int8_layer_names"]) - ("model.lm_head" in plan["int8_layer_names"]) > 0
    assert types["Q4_1"] > 0 and types["F32"] > 0
    # within a few percent of the ideal size: blocks of 32 with fp16 side data, vocabulary beside
    assert artifact["bytes"] <= 1.1 * artifact["ideal_bytes"] + 64 * 1024, artifact


def test_the_file_holds_the_models_weights_on_their_grids(gguf_export, llama_dir):
    """Read back by llama.cpp's names and types (q and k in llama.cpp's interleaved rope order),
    every 4-bit tensor dequantizes to the offset grid's fit of the source weight, which Q4_1 holds
    exactly, an 8-bit one to within half a grid step of the source, norms exactly."""
    from safetensors.torch import load_file

    _, _, bundle = gguf_export
    source = load_file(str(llama_dir / "model.safetensors"))
    fitted = offset_grid_weights(llama_dir)
    config = json.loads((llama_dir / "config.json").read_text())
    stored = _weights(bundle / "gguf" / "model.gguf")
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        for gg, hf in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                       ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                       ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            pairs[f"blk.{i}.{gg}.weight"] = f"model.layers.{i}.{hf}.weight"
    assert set(stored) == set(pairs)  # tied: no output.weight, llama.cpp reads token_embd
    for name, hf in pairs.items():
        kind, values = stored[name]
        want = source[hf].float().numpy()
        if ".attn_q." in name:
            values = _unpermute(values, config["num_attention_heads"])
        if ".attn_k." in name:
            values = _unpermute(values, config["num_key_value_heads"])
        if kind == "F32":
            assert np.array_equal(values, want), name
            continue
        if kind == "Q4_1":
            assert np.allclose(values, fitted[hf], rtol=0, atol=1e-6), name
            continue
        blocks = want.reshape(want.shape[0], -1, 32)
        step = (blocks.max(-1) - blocks.min(-1)) / (15 if kind.startswith("Q4") else 127)
        error = np.abs(values - want).reshape(blocks.shape).max(-1)
        assert kind == "Q8_0" and (error <= 0.51 * step + 1e-6).all(), (name, kind, float((error / step).max()))


def test_a_q4_1_source_survives_unchanged(llama_dir, tmp_path):
    """A model already on GGUF's Q4_1 grid (as the real SmolLM2 package ships) is stored on the
    same grid, weight for weight: the .gguf dequantizes to exactly the source, and its perplexity
    is the source's within llama.cpp's own arithmetic."""
    import gguf
    from safetensors.torch import load_file, save_file

    model = tmp_path / "on-grid"
    shutil.copytree(llama_dir, model)
    weights = load_file(str(model / "model.safetensors"))
    for name, w in weights.items():
        if w.ndim == 2:
            q = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q4_1)
            weights[name] = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_1).reshape(w.shape).copy())
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, summary = export_json(str(model), "--target", "gguf", "--mixed-precision", "off", "--out", str(tmp_path / "out"))
    assert code == 0, json.dumps(summary)[:3000]
    bundle = tmp_path / "out" / "on-grid"
    stored = _weights(bundle / "gguf" / "model.gguf")
    assert np.array_equal(stored["token_embd.weight"][1], weights["model.embed_tokens.weight"].numpy())
    assert np.array_equal(stored["blk.0.ffn_down.weight"][1], weights["model.layers.0.mlp.down_proj.weight"].numpy())
    manifest = read_manifest(bundle)
    quality = manifest["quality"]["artifacts"]["gguf"]
    # fp32 here is the on-grid source itself: what is left is llama.cpp's int8 activations and fp16 cache
    assert abs(quality["increase_pct"]) < 1.0, quality


def test_a_gguf_file_is_a_source_and_its_stored_types_are_recorded(gguf_export, tmp_path):
    """edgepack's own .gguf (Q4_1 blocks, the plan's Q8_0 layers, F32 norms) read back as a source
    through transformers' GGUF loader: the manifest records the file and how it stored its weights,
    and the Q4_1 tensors come out of a second GGUF export as the same values (rounding on the grid
    they are already on changes nothing)."""
    from edgepack.packaging.bundle import read_bundle

    source = tmp_path / "tiny.gguf"
    shutil.copy(gguf_export[2] / "gguf" / "model.gguf", source)
    code, summary = export_json(str(source), "--target", "gguf", "--mixed-precision", "off", "--out", str(tmp_path / "out"))
    assert code == 0, json.dumps(summary)[:3000]
    bundle = tmp_path / "out" / "tiny"
    model = read_bundle(bundle)["model"]
    assert model["source_kind"] == "gguf" and [f["name"] for f in model["weight_files"]] == ["tiny.gguf"]
    before = _weights(source)
    kinds = Counter(kind for kind, _ in before.values())
    stored = model["source_quantization"]
    assert stored["format"] == "gguf" and stored["file_type"] == "MOSTLY_Q4_1"
    assert {k: v["tensors"] for k, v in stored["tensor_types"].items()} == dict(kinds) and set(kinds) == {"Q4_1", "Q8_0", "F32"}
    # every parameter of the model is in one of the file's tensors (the tied head is token_embd)
    assert sum(v["parameters"] for v in stored["tensor_types"].values()) == model["parameter_count"]
    after = _weights(bundle / "gguf" / "model.gguf")
    for name, (kind, values) in before.items():
        if kind == "Q4_1":
            assert after[name][0] == "Q4_1" and np.array_equal(after[name][1], values), name
    shown = " ".join(run_cli("inspect", bundle).stdout.split())
    types = ", ".join(f"{kind} {n['parameters']:,}" for kind, n in stored["tensor_types"].items())
    assert f"source stored as │ MOSTLY_Q4_1: {types}" in shown, shown


def test_q4_0_is_smaller_and_symmetric(llama_dir, tmp_path):
    code, summary = export_json(str(llama_dir), "--target", "gguf", "--gguf-type", "Q4_0", "--mixed-precision", "off",
                                "--out", str(tmp_path))
    assert code == 0, json.dumps(summary)[:3000]
    [artifact] = read_manifest(tmp_path / "tiny-llama")["artifacts"]
    assert set(artifact["quantization"]["gguf_types"]) == {"Q4_0", "F32"}
    kinds = {kind for kind, _ in _weights(tmp_path / "tiny-llama" / "gguf" / "model.gguf").values()}
    assert kinds == {"Q4_0", "F32"}


def test_q4_k_m_is_llama_cpps_own_mix(tmp_path):
    """--gguf-type Q4_K_M: llama.cpp's quantizer chooses each tensor's type (rows of 256, so its
    K-quants apply: Q4_K, and Q6_K where the mix spends more); llama.cpp answers like the weights
    it stored, the size is what those types hold, and the manifest says no plan was applied."""
    from demo_model.build import build_decoder_dir
    from edgepack.pipeline import OWN_QUANTIZER

    # a short fit: the smoke compares llama.cpp with the weights it stored, not with a decisive model
    model = build_decoder_dir(tmp_path / "k-llama", "llama", max_train_steps=20, hidden_size=256, intermediate_size=512)
    code, summary = export_json(str(model), "--target", "gguf", "--gguf-type", "Q4_K_M", "--out", str(tmp_path / "out"))
    assert code == 0, json.dumps(summary)[:3000]
    bundle = tmp_path / "out" / "k-llama"
    manifest = read_manifest(bundle)
    [artifact] = manifest["artifacts"]
    greedy = manifest["comparisons"]["lowering_fidelity"]["gguf"]["cases"]["greedy"]
    assert greedy["steps_verified"] == 16 and not greedy["failures"] and greedy["min_cosine"] >= 0.99, greedy
    tensors = _reader(bundle / "gguf" / "model.gguf").tensors
    types = Counter(t.tensor_type.name for t in tensors)
    assert artifact["quantization"]["gguf_types"] == dict(sorted(types.items()))
    assert types["Q4_K"] > 0 and types["Q6_K"] > 0 and set(types) <= {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"}, types
    assert artifact["ideal_bytes"] == sum(int(t.n_bytes) for t in tensors)
    quantized = [t for t in tensors if t.tensor_type.name != "F32"]
    bits = 8 * sum(int(t.n_bytes) for t in quantized) / sum(int(t.n_elements) for t in quantized)
    assert 4.5 <= bits <= 6.6, bits  # Q4_K 4.5, Q6_K 6.5625 bits a weight
    assert manifest["quantization"]["plans"] == {OWN_QUANTIZER: {"backends": ["gguf"]}}
    assert "plan" not in artifact["quantization"] and artifact["quantization"]["gguf_type"] == "Q4_K_M"
    assert "int4 stored as │ llama.cpp's Q4_K_M mix" in " ".join(run_cli("inspect", bundle).stdout.split())


def test_q4_k_m_needs_int4(llama_dir, tmp_path):
    result = run_cli("export", llama_dir, "--target", "gguf", "--gguf-type", "Q4_K_M", "--quant", "int8", "--out", tmp_path)
    assert result.exit_code != 0 and "--gguf-type Q4_K_M is a 4-bit mix; --quant int8" in result.stderr
    assert not (tmp_path / "tiny-llama").exists()


def test_the_embedded_tokenizer_is_the_models(gguf_export, llama_dir):
    """What llama.cpp reads from the file: the same ids as Hugging Face's tokenizer on the check
    texts (special tokens in text too), a stop on every eos id, the chat template verbatim."""
    _, _, bundle = gguf_export
    [artifact] = read_manifest(bundle)["artifacts"]
    check = artifact["runtime"]["tokenizer"]["check"]
    assert check["passed"] and check["eos_ids_stop"] and check["texts"] == 12, check
    fields = _reader(bundle / "gguf" / "model.gguf").fields
    assert fields["tokenizer.chat_template"].contents() == (llama_dir / "chat_template.jinja").read_text()
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 1 and fields["tokenizer.ggml.eot_token_id"].contents() == 2


def test_a_wrong_pre_tokenizer_is_caught_by_llama_cpp(llama_dir, tmp_path):
    """The check can fail: the same vocabulary written with Qwen2's pre-tokenizer (digits one by
    one) gives llama.cpp other ids on the digits text, and the check names it."""
    import gguf
    from transformers import AutoConfig

    from edgepack.exporters.gguf.runtime import check_embedded_tokenizer
    from edgepack.exporters.tokenizer import read_tokenizer

    tok = read_tokenizer(llama_dir, AutoConfig.from_pretrained(llama_dir), check_runner=False)
    vocab = read_vocab(tok, 512)
    writer = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    writer.add_block_count(1)
    write_vocab(writer, GgufVocab(vocab.model, "qwen2", vocab.tokens, vocab.types, vocab.merges), tok)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    check = check_embedded_tokenizer(tmp_path / "v.gguf", tok)
    assert not check["passed"] and any(m["text"].startswith("1234567890") for m in check["mismatches"]), check


def test_a_tokenizer_llama_cpp_cannot_express_is_refused(llama_dir, tmp_path):
    model = tmp_path / "odd-tokenizer"
    shutil.copytree(llama_dir, model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    code, summary = export_json(str(model), "--target", "gguf", "--out", str(tmp_path / "out"))
    assert code != 0 and not (tmp_path / "out" / "odd-tokenizer").exists()
    message = json.dumps(summary)
    assert "llama.cpp's vocabulary cannot express this tokenizer" in message and "Whitespace" in message, message


def test_an_encoder_is_refused_by_name(bert_dir, tmp_path):
    """Named in --target, a backend that cannot take the model is bad input (exit 2, nothing
    written); under --target all it is skipped instead (tests/e2e/test_encoders.py, the real MiniLM)."""
    code, summary = export_json(str(bert_dir), "--target", "gguf", "--out", str(tmp_path))
    assert code == 2 and "llama.cpp runs decoder LMs" in json.dumps(summary)
    assert not any(tmp_path.iterdir())


def _on_grid(values: np.ndarray, want: np.ndarray, kind: str, steps: float = 0.51) -> bool:
    """Whether `values` (a Q4_1 / Q8_0 tensor read back) is `want` rounded on its grid: within half
    a step (or `steps`) of each block of 32 along the stored rows."""
    blocks = want.reshape(want.shape[0], -1, 32)
    step = (blocks.max(-1) - blocks.min(-1)) / (15 if kind.startswith("Q4") else 127)
    return values.shape == want.shape and bool((np.abs(values - want).reshape(blocks.shape).max(-1) <= steps * step + 1e-6).all())


def _field(reader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory) -> Path:
    from demo_model.build import build_decoder_dir

    return build_decoder_dir(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3", "gemma3")


def test_gemma_norms_are_stored_plus_one_and_sliding_layers_described(gemma3_dir, tmp_path):
    """Gemma's RMSNorm scales by (1 + w): the file holds every norm (q/k norms too) as w + 1, while
    its 4-bit weights are the offset grid's fit of the source's; llama.cpp is told which layers slide, over
    which window and with which rope base, and answers like the stored weights."""
    from safetensors.torch import load_file

    code, summary = export_json(str(gemma3_dir), "--target", "gguf", "--max-seq-len", "64", "--eval-text", str(SHORT_EVAL_TEXT),
                                "--out", str(tmp_path))
    assert code == 0, json.dumps(summary)[:3000]
    bundle = tmp_path / "tiny-gemma3"
    greedy = read_manifest(bundle)["comparisons"]["lowering_fidelity"]["gguf"]["cases"]["greedy"]
    assert greedy["steps_verified"] == 16 and not greedy["failures"] and greedy["min_cosine"] >= 0.99, greedy
    source = load_file(str(gemma3_dir / "model.safetensors"))
    stored = _weights(bundle / "gguf" / "model.gguf")
    norms = {"output_norm.weight": "model.norm.weight"}
    for i in range(2):
        for gg, hf in (("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                       ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
                       ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")):
            norms[f"blk.{i}.{gg}.weight"] = f"model.layers.{i}.{hf}.weight"
    for name, hf in norms.items():
        kind, values = stored[name]
        assert kind == "F32" and np.array_equal(values, source[hf].float().numpy() + 1), name
    kind, values = stored["blk.0.attn_q.weight"]  # neox rope: q rows in Hugging Face's order
    fitted = offset_grid_weights(gemma3_dir)["model.layers.0.self_attn.q_proj.weight"]
    assert kind == "Q4_1" and np.allclose(values, fitted, rtol=0, atol=1e-6)
    reader = _reader(bundle / "gguf" / "model.gguf")
    assert _field(reader, "gemma3.attention.sliding_window") == 16
    assert _field(reader, "gemma3.attention.sliding_window_pattern") == [True, False]  # layer_types
    assert _field(reader, "gemma3.rope.freq_base") == 1e6 and _field(reader, "gemma3.rope.freq_base_swa") == 1e4
    assert _field(reader, "gemma3.attn_logit_softcapping") is None and "output.weight" not in stored  # tied head


@pytest.mark.parametrize("gguf_type", ["Q4_1", "Q4_K_M"])
def test_the_reference_holds_the_files_values_in_hugging_faces_layout(gemma3_dir, tmp_path, gguf_type):
    """What the smoke compares llama.cpp with (work.stored) is each tensor of the written file read
    back, in the module's own layout and values: the file's norms are the stored ones + 1; for
    Q4_K_M, after llama.cpp's quantizer chose the types. The plan's norms are the module's exactly."""
    import gguf

    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.gguf import lower
    from edgepack.exporters.gguf.options import Options
    from edgepack.exporters.sources import load_source
    from edgepack.quant import QuantSpec

    loaded = load_source(str(gemma3_dir))
    work = lower._Work(capture(loaded, CaptureOptions(max_seq_len=64)), QuantSpec.from_options("int4"),
                       Options(type=gguf_type), tmp_path)
    steps = lower.PLAN_STEPS if gguf_type == "Q4_1" else lower.LLAMA_CPP_STEPS
    for step in steps:
        if step.name != "check tokenizer":
            step.run(work)
    params = dict(loaded.module.named_parameters())
    file = gguf.GGUFReader(work.path)
    assert {t.name for t in file.tensors} == set(work.hf_names) and len(work.stored) == len(file.tensors)
    for t in file.tensors:
        hf = work.hf_names[t.name]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        want = work.stored[hf].numpy()
        if hf.endswith("norm.weight"):
            want = want + 1
            if gguf_type == "Q4_1":
                assert torch.equal(work.stored[hf], params[hf].detach()), hf
        assert np.array_equal(values, want), (hf, t.tensor_type.name)
    if gguf_type == "Q4_K_M":
        assert {t.tensor_type.name for t in file.tensors} - {"F32"}, "llama.cpp's quantizer quantized nothing"


def test_gpt2_conv1d_weights_are_stored_transposed_on_their_grid(tmp_path):
    """GPT-2's Conv1D weights are [in, out]; llama.cpp reads [out, in] and quantizes blocks of 32
    along those rows: every attn_qkv / attn_output / ffn_up / ffn_down tensor is the transposed
    source on its Q4_1 grid (blocks along the input width), the learned positions are in, the keys
    are LayerNorm's, the MLP width is 4x the embedding (n_inner unset), and llama.cpp answers
    like the stored weights."""
    from safetensors.torch import load_file

    from demo_model.build import build_decoder_dir

    model = build_decoder_dir(tmp_path / "tiny-gpt2", "gpt2")
    code, summary = export_json(str(model), "--target", "gguf", "--max-seq-len", "64", "--mixed-precision", "off",
                                "--out", str(tmp_path / "out"))
    assert code == 0, json.dumps(summary)[:3000]
    bundle = tmp_path / "out" / "tiny-gpt2"
    greedy = read_manifest(bundle)["comparisons"]["lowering_fidelity"]["gguf"]["cases"]["greedy"]
    assert greedy["steps_verified"] == 16 and not greedy["failures"] and greedy["min_cosine"] >= 0.99, greedy
    source = load_file(str(model / "model.safetensors"))
    fitted = offset_grid_weights(model)  # as Linear weights, [out, in]: the fit runs under --mixed-precision off too
    stored = _weights(bundle / "gguf" / "model.gguf")
    for i in range(2):
        for gg, hf in (("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"), ("ffn_up", "mlp.c_fc"),
                       ("ffn_down", "mlp.c_proj")):
            kind, values = stored[f"blk.{i}.{gg}.weight"]
            conv1d = source[f"transformer.h.{i}.{hf}.weight"].float().numpy()
            # the fit clips a block's range by up to a step, so the source is within a step and a half
            assert kind == "Q4_1" and _on_grid(values, conv1d.T, kind, steps=1.51), (gg, values.shape, conv1d.shape)
            assert np.allclose(values, fitted[f"transformer.h.{i}.{hf}.weight"], atol=1e-6, rtol=0), gg
            assert np.array_equal(stored[f"blk.{i}.{gg}.bias"][1], source[f"transformer.h.{i}.{hf}.bias"].numpy())
    assert stored["position_embd.weight"][1].shape == (512, 64)
    reader = _reader(bundle / "gguf" / "model.gguf")
    assert _field(reader, "gpt2.feed_forward_length") == 256 and _field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert _field(reader, "gpt2.rope.freq_base") is None and _field(reader, "gpt2.attention.layer_norm_rms_epsilon") is None


LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
# Qwen2.5's long-context YaRN at the tiny models' scale: frequencies 0-2 of 8 blended, 3-7 divided by 4
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
@pytest.mark.parametrize("family, rope, gguf_type", [("llama3", None, "Q4_1"), ("llama3", None, "Q4_K_M"),
                                                     ("qwen2", LINEAR_ROPE, "Q4_1"), ("phi3_longrope", None, "Q4_1"),
                                                     ("qwen2", YARN_ROPE, "Q4_1"), ("qwen2", YARN_ROPE | {"mscale": 2.0, "mscale_all_dim": 1.0}, "Q4_1")])
def test_scaled_rope_is_written_as_llama_cpp_reads_it(tmp_path, family, rope, gguf_type):
    """A rope whose frequencies are scaled (Llama 3.x's; a linear scaling; Phi-3.5's LongRoPE) is
    written as llama.cpp reads it: Llama 3's factors as the rope_freqs tensor (kept by llama.cpp's
    quantizer for Q4_K_M), the model's own frequencies (transformers') into llama.cpp's
    base^(-2i/n); a linear scaling as the rope scaling keys; LongRoPE's two tables as tensors, with
    the original length and the attention factor as keys. The scaling moves this model's logits far
    outside the smoke's tolerance, so the smoke passing at every step shows llama.cpp computes the
    scaled rope."""
    import transformers

    from demo_model.build import build_decoder_dir

    model = build_decoder_dir(tmp_path / f"tiny-{family}", family, rope_parameters=rope)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    rope = hf.config.rope_parameters
    unscaled = transformers.AutoModelForCausalLM.from_pretrained(
        model, rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]}).eval()
    ids = torch.arange(4, 36).reshape(1, -1)
    with torch.no_grad():
        moved = torch.nn.functional.cosine_similarity(hf(ids).logits[0], unscaled(ids).logits[0], dim=-1)
    assert moved.min() < 0.95, moved  # what the smoke's 0.99 bound would catch

    code, summary = export_json(str(model), "--target", "gguf", "--gguf-type", gguf_type, "--max-seq-len", "64",
                                "--eval-text", str(SHORT_EVAL_TEXT), "--out", str(tmp_path / "out"))
    assert code == 0, json.dumps(summary)[:3000]
    bundle = tmp_path / "out" / model.name
    greedy = read_manifest(bundle)["comparisons"]["lowering_fidelity"]["gguf"]["cases"]["greedy"]
    assert greedy["steps_verified"] == 16 and not greedy["failures"] and greedy["min_cosine"] >= 0.99, greedy
    reader, arch = _reader(bundle / "gguf" / "model.gguf"), hf.config.model_type
    stored = _weights(bundle / "gguf" / "model.gguf")
    if rope["rope_type"] == "llama3":
        kind, factors = stored["rope_freqs.weight"]
        inv_freq = hf.model.rotary_emb.inv_freq.double().numpy()
        want = 10000.0 ** (-np.arange(0, 16, 2) / 16) / inv_freq
        assert kind == "F32" and np.allclose(factors.reshape(-1), want, rtol=1e-6), (factors, want)
        assert factors.max() == pytest.approx(8.0) and factors.min() < 8.0  # scaled and smoothed dimensions
        assert _field(reader, f"{arch}.rope.scaling.type") is None
    elif rope["rope_type"] == "yarn":
        attention = hf.model.rotary_emb.attention_scaling  # 1 + 0.1 ln 4, or (1 + 0.2 ln 4) / (1 + 0.1 ln 4) with mscale
        assert attention == pytest.approx((1 + 0.1 * rope.get("mscale", 1) * np.log(4)) / (1 + 0.1 * np.log(4) if "mscale" in rope else 1))
        assert _field(reader, f"{arch}.rope.scaling.type") == "yarn" and _field(reader, f"{arch}.rope.scaling.factor") == 4.0
        assert _field(reader, f"{arch}.rope.scaling.original_context_length") == 128
        assert _field(reader, f"{arch}.rope.scaling.attn_factor") == pytest.approx(attention / (1 + 0.1 * np.log(4)))
        assert "rope_freqs.weight" not in stored
    elif rope["rope_type"] == "longrope":
        for table in ("long", "short"):
            kind, factors = stored[f"rope_factors_{table}.weight"]
            assert kind == "F32" and np.array_equal(factors.reshape(-1), np.float32(PHI3_LONGROPE[f"{table}_factor"]))
        assert _field(reader, f"{arch}.rope.scaling.original_context_length") == 256
        assert _field(reader, f"{arch}.rope.scaling.attn_factor") == pytest.approx(1.5 ** 0.5)
        assert _field(reader, f"{arch}.context_length") == 512 and "rope_freqs.weight" not in stored
    else:
        assert "rope_freqs.weight" not in stored
        assert _field(reader, f"{arch}.rope.scaling.type") == "linear" and _field(reader, f"{arch}.rope.scaling.factor") == 4.0


@pytest.mark.parametrize("family, edit, reason", [
    ("mistral", {}, "llama.cpp's LLAMA graph has no sliding window, and this model's layers attend only to the last 16 of its 512 positions"),
    ("qwen2", {"rope_parameters": LLAMA3_ROPE}, "llama.cpp's QWEN2 graph reads no per-frequency rope factors (rope_freqs)"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "sliding_attention": YARN_ROPE}},
     "rope type 'yarn' on sliding_attention layers is not written to GGUF yet"),
    ("qwen2", {"rope_parameters": YARN_ROPE | {"beta_fast": 16}}, "yarn rope with beta_fast 16 and beta_slow None: "
     "llama-cpp-python (and so the smoke) overrides the file's with 32 and 1"),
    ("qwen2", {"rope_parameters": PHI3_LONGROPE}, "llama.cpp's QWEN2 graph reads no per-frequency rope factors "
     "(rope_factors_long and rope_factors_short), which longrope rope needs"),
    ("gemma2", {"query_pre_attn_scalar": 32}, "llama.cpp's GEMMA2 graph scales queries by 1/sqrt(16) and reads no query_pre_attn_scalar; this model's is 32"),
    ("gemma2", {"attn_logit_softcapping": None}, "llama.cpp's GEMMA2 graph always soft-caps attention logits"),
])
def test_what_llama_cpp_cannot_compute_is_refused(tmp_path, family, edit, reason):
    from demo_model.build import build_decoder_dir

    model = build_decoder_dir(tmp_path / f"tiny-{family}", family, max_train_steps=0)  # refused before any lowering
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | edit))
    result = run_cli("export", model, "--target", "gguf", "--out", tmp_path / "out")
    assert result.exit_code == 2 and reason in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "out" / model.name).exists()


def test_longrope_past_its_original_length_is_refused(tmp_path):
    """Past the original length llama.cpp turns every position by LongRoPE's long factors, where
    the model turns the first 256 by the short ones: the smoke cannot check the file there. 257
    positions is past it: llama.cpp rounds the context up to 512. Named in --target, an input
    error before any work; under --target all, GGUF and CoreML (which cannot convert the switch)
    are left out and the others kept."""
    from demo_model.build import build_decoder_dir
    from edgepack.exporters.registry import BACKENDS
    from edgepack.exporters.sources import load_source
    from edgepack.pipeline import backends_for
    from edgepack.quant import QuantSpec

    model = build_decoder_dir(tmp_path / "tiny-phi3", "phi3_longrope", max_train_steps=0)
    result = run_cli("export", model, "--target", "gguf", "--max-seq-len", "257", "--out", tmp_path / "out")
    stderr = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "longrope with --max-seq-len 257 over the model's original 256 positions" in stderr
    assert "give --max-seq-len 256 or less" in stderr, stderr
    assert not (tmp_path / "out" / model.name).exists()
    loaded, int4 = load_source(str(model)), QuantSpec.from_options("int4")
    kept, skipped = backends_for(list(BACKENDS.values()), loaded, int4, "all", 257)
    assert sorted(b.name for b in kept) == ["executorch", "mnn", "onnx", "tflite"], skipped
    assert [s.split(":")[0] for s in skipped] == ["coreml", "gguf"] and "give --max-seq-len 256 or less" in skipped[0]
    kept, skipped = backends_for(list(BACKENDS.values()), loaded, int4, "all", 256)  # within: every backend
    assert len(kept) == len(BACKENDS) and not skipped


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory) -> Path:
    """A SentencePiece BPE model trained on the demo corpus as Llama 2 and Mistral trained theirs
    (byte fallback, digits split, whitespace kept, a dummy "▁" prefix), and the tokenizer.json
    transformers converts it to: a model folder's tokenizer files as those checkpoints ship them."""
    import sentencepiece
    from transformers import AutoTokenizer

    from demo_model.build import CORPUS_PATH

    folder = tmp_path_factory.mktemp("sentencepiece")
    sentencepiece.SentencePieceTrainer.train(
        input=str(CORPUS_PATH), model_prefix=str(folder / "tokenizer"), vocab_size=1024, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                              "eos_token": "</s>", "unk_token": "<unk>"}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    return folder


def test_a_sentencepiece_model_is_written_as_llama_cpps_llama_vocabulary(sentencepiece_dir, tmp_path):
    """tokenizer.model's pieces, scores and kinds go into the file as they are; llama.cpp reading it
    tokenizes every check text without special tokens exactly as SentencePiece itself does (the
    tokenizer the model was trained with). Where transformers' conversion of the same model differs
    (runs of leading spaces, a space after a special token in text), the export's check names it."""
    import gguf
    import sentencepiece

    from edgepack.exporters.gguf.runtime import check_embedded_tokenizer, load
    from edgepack.exporters.tokenizer import RUNNER_CHECK_TEXTS
    from edgepack.stages import TokenizerFacts

    tok = TokenizerFacts(sentencepiece_dir, ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"), 1, (2,), None,
                         None, True)
    vocab = read_vocab(tok, 1030)  # six embedding rows past the tokenizer's, as models pad theirs
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    assert (vocab.model, vocab.pre, vocab.add_space_prefix) == ("llama", "default", True)
    assert vocab.tokens[:1024] == [sp.IdToPiece(i) for i in range(1024)] and vocab.tokens[1024:] == [f"[PAD{i}]" for i in range(1024, 1030)]
    assert vocab.scores[:1024] == [sp.GetScore(i) for i in range(1024)]
    assert vocab.types[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE]  # <unk> <s> </s> as added tokens, then <0x00>
    assert vocab.types.count(gguf.TokenType.BYTE) == 256 and vocab.types[1024:] == [gguf.TokenType.UNUSED] * 6
    writer = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    writer.add_block_count(1)
    write_vocab(writer, vocab, tok)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    llm = load(tmp_path / "v.gguf", 64, vocab_only=True)
    for text in RUNNER_CHECK_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), text
    check = check_embedded_tokenizer(tmp_path / "v.gguf", tok)
    assert not check["passed"] and {m["text"][:9] for m in check["mismatches"]} == {"   leadin", "<s> </s> "}, check
