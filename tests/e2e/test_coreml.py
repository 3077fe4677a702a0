"""CoreML backend: .mlpackage export through the real coremltools, checked on Linux by the numpy
evaluator of the MIL program read back from the saved package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepack.exporters.coreml.mil import load_program
from edgepack.packaging.bundle import directory_digest
from edgepack.packaging.manifest import read_manifest
from tests.conftest import LLAMA_BACKEND_OPTIONS, export_json, offset_grid_weights, run_cli

PACKAGE = "coreml/model.mlpackage"


# Layers the QuantSpec quantizes in the tiny Llama: q, k, v, o, gate, up, down per layer (2 layers)
# plus the embedding, tied to the LM head and stored once.
TINY_LLAMA_QUANTIZED_WEIGHTS = 2 * 7 + 1


@pytest.fixture(scope="session")
def coreml_mixed_bert(bert_dir, tmp_path_factory) -> tuple[int, dict, Path]:
    """The tiny BERT mean pooled, at a floor all-int4 misses (0.991 < 0.998): the plan keeps some
    layers int8 (measured: the word and token-type embedding tables) and the rest int4."""
    out = tmp_path_factory.mktemp("dist-mixed-bert")
    code, summary = export_json(str(bert_dir), "--target", "coreml", "--pooling", "mean", "--min-cosine", "0.998",
                                "--out", str(out))
    return code, summary, out / "tiny-bert"


def _stored_weights(package: Path) -> dict[str, str]:
    """Weight placeholder -> how the package stores it, read back and spelled as WeightQuant.describe()."""
    from coremltools.converters.mil.mil import types

    def described(op) -> str:
        scales = op.scale.shape[1]
        grouping = "per-channel" if scales == 1 else f"g{op.data.shape[1] // scales}"
        return f"{types.builtin_to_string(op.data.dtype)} {grouping} {'sym' if op.offset is None else 'asym'}"
    return {op.name.removesuffix("_to_fp16_quantized"): described(op)
            for op in load_program(package).functions["main"].operations if op.op_type == "constexpr_blockwise_shift_scale"}


@pytest.mark.slow
def test_llama_mlpackage_decodes_like_the_quantized_model(coreml_llama):
    code, summary, bundle = coreml_llama
    assert code == 0, summary
    manifest = read_manifest(bundle)
    fidelity = manifest["comparisons"]["lowering_fidelity"]["coreml"]
    greedy = fidelity["cases"]["greedy"]
    assert fidelity["passed"] and greedy["tokens_match"] and greedy["top1_agreement"] == 1.0
    assert greedy["min_cosine"] >= 0.99
    # `edgepack smoke` replays the shipped package again, from the files on disk
    result = run_cli("smoke", bundle, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"]["coreml"]["cases"]["greedy"]["tokens_match"]


@pytest.mark.slow
def test_llama_package_holds_int4_blocks_states_and_metadata(coreml_llama, llama_dir):
    import coremltools as ct
    from coremltools.converters.mil.mil import types

    bundle = coreml_llama[2]
    manifest = read_manifest(bundle)
    [art] = manifest["artifacts"]
    program = load_program(bundle / PACKAGE)
    ops = [op.op_type for op in program.functions["main"].operations]
    assert ops.count("constexpr_blockwise_shift_scale") == TINY_LLAMA_QUANTIZED_WEIGHTS
    assert art["quantization"]["compressed_weight_ops"] == {"constexpr_blockwise_shift_scale": TINY_LLAMA_QUANTIZED_WEIGHTS}
    int4_blocks = [op for op in program.functions["main"].operations if op.op_type == "constexpr_blockwise_shift_scale"]
    # the default offset grid: uint4 codes, one scale and one float offset per block, both in the
    # compute precision (this export's is fp32)
    assert all(types.builtin_to_string(op.data.dtype) == "uint4" for op in int4_blocks)
    assert all(op.offset is not None and types.builtin_to_string(op.offset.dtype) == "fp32" for op in int4_blocks)
    assert all(op.data.shape[1] // op.scale.shape[1] == 32 for op in int4_blocks)  # block = group size
    assert art["quantization"]["compression"] == "int4_offset" and art["quantization"]["grid"] == "offset"

    model = ct.models.MLModel(str(bundle / PACKAGE), skip_model_load=True)
    spec = model.get_spec()
    assert spec.specificationVersion == art["runtime"]["specification_version"] >= 9  # iOS 18
    meta = dict(spec.description.metadata.userDefined)
    assert meta["tokenizer.bos_id"] == "0" and meta["tokenizer.eos_ids"] == "1,2"
    assert meta["generation.max_seq_len"] == str(manifest["generation"]["max_seq_len"])
    assert meta["tokenizer.chat_template"].startswith("present")
    assert spec.description.metadata.author == "edgepack"
    # states, inputs and outputs are what the manifest says (what an iOS app binds to)
    states = {s.name: list(s.type.stateType.arrayType.shape) for s in spec.description.state}
    assert states == {s["name"]: s["shape"] for s in art["runtime"]["states"]} and len(states) == 4
    # the memory report's KV cache is these states: fp16 (CoreML's only state type), whole at load
    fp16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    assert all(s.type.stateType.arrayType.dataType == fp16 for s in spec.description.state)
    kv = art["memory"]["kv_cache"]
    assert (kv["dtype"], kv["allocation"]) == ("float16", "static")
    assert kv["bytes_at_max_context"] == sum(2 * int(np.prod(shape)) for shape in states.values())
    [method] = art["methods"]
    assert [i.name for i in spec.description.input] == [i["name"] for i in method["inputs"]] == ["tokens", "input_pos"]
    assert [i["dtype"] for i in method["inputs"]] == ["int32", "int32"]
    assert all(i.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
               for i in spec.description.input)
    assert [o.name for o in spec.description.output] == ["logits"]
    assert spec.description.output[0].type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert "KV-cache" in spec.description.input[1].shortDescription


@pytest.mark.slow
def test_llama_weights_fit_the_ideal_size(coreml_llama):
    """weight.bin holds the int4 blocks, their scales and the unquantized rest, plus what the
    converter adds: a 64-byte header and 64-byte alignment per blob (~40 blobs) and zero bias
    vectors for the bias-free linears (the LM head's alone is 2 KB in fp32): ~10 KB on this 68 KB
    model, measured 1.14x, so 15% is allowed here. The program text (model.mlmodel, ~66 KB of op
    and tensor names) dominates a model this small; MiniLM below holds the whole package to 10%."""
    bundle = coreml_llama[2]
    [art] = read_manifest(bundle)["artifacts"]
    weights = (bundle / PACKAGE / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    assert weights <= 1.15 * art["ideal_bytes"], (weights, art["ideal_bytes"])
    assert art == {**art, **directory_digest(bundle / PACKAGE)}  # sha256/bytes as the schema defines them


@pytest.mark.slow
def test_offset_grid_blocks_span_each_fitted_blocks_range(coreml_llama, llama_dir):
    """Each stored block, decompressed by coremltools itself, spans the fitted block's [min, max]
    (codes 0 and 15, up to fp16 rounding; the fit to the calibration text runs under
    --mixed-precision off too), and every weight is within half a step of its fitted value: the
    grid a Q4_1 source is already on."""
    program = load_program(coreml_llama[2] / PACKAGE)
    # the tied table once (the state dict names it twice)
    weights = list({w.tobytes(): w for w in offset_grid_weights(llama_dir).values() if w.ndim == 2}.values())
    blocks = [op for op in program.functions["main"].operations if op.op_type == "constexpr_blockwise_shift_scale"]
    assert len(blocks) == TINY_LLAMA_QUANTIZED_WEIGHTS
    for op in blocks:
        stored = np.asarray(op.materialized_val_inference(), dtype=np.float32)
        step = np.repeat(np.asarray(op.scale.val, dtype=np.float32), 32, axis=1)
        [w] = [w for w in weights if w.shape == stored.shape and (np.abs(w - stored) <= 0.5 * step + 1e-3).all()]
        rows = stored.shape[0]
        slack = 1e-6 * np.abs(w).max()  # fp32 arithmetic (this export's compute precision)
        assert np.abs(stored.reshape(rows, -1, 32).max(-1) - w.reshape(rows, -1, 32).max(-1)).max() <= slack
        assert np.abs(stored.reshape(rows, -1, 32).min(-1) - w.reshape(rows, -1, 32).min(-1)).max() <= slack


@pytest.mark.slow
@pytest.mark.extended  # CI's 45-minute budget (the clean-clone run on an AMD EPYC host, 2026-12-02)
def test_symmetric_grid_is_coremltools_own_quantizer(llama_dir, tmp_path):
    """--coreml-grid symmetric: coremltools' linear_symmetric int4 blocks (no offsets), decoding
    token for token like its reference (fp32 compute, as the shared export)."""
    from coremltools.converters.mil.mil import types

    code, summary = export_json(str(llama_dir), "--target", "coreml", "--coreml-grid", "symmetric",
                                *LLAMA_BACKEND_OPTIONS["coreml"], "--out", str(tmp_path))
    assert code == 0, json.dumps(summary)[:3000]
    bundle = tmp_path / "tiny-llama"
    [art] = read_manifest(bundle)["artifacts"]
    assert art["quantization"]["compression"] == "int4" and art["quantization"]["grid"] == "symmetric"
    blocks = [op for op in load_program(bundle / PACKAGE).functions["main"].operations
              if op.op_type == "constexpr_blockwise_shift_scale"]
    assert len(blocks) == TINY_LLAMA_QUANTIZED_WEIGHTS
    assert all(types.builtin_to_string(op.data.dtype) == "int4" and op.offset is None for op in blocks)
    greedy = read_manifest(bundle)["comparisons"]["lowering_fidelity"]["coreml"]["cases"]["greedy"]
    assert greedy["tokens_match"] and greedy["top1_agreement"] == 1.0


def test_ios17_is_refused_for_a_stateful_int4_model(llama_dir, tmp_path):
    result = run_cli("export", llama_dir, "--target", "coreml", "--ios-target", "17", "--out", tmp_path, "--strict")
    assert result.exit_code == 2
    assert "stateful KV cache" in result.stderr and "int4 per-block" in result.stderr and "iOS 18" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.extended  # CoreML is in the shared MiniLM export of make test-extended only (conftest.minilm_targets)
def test_minilm_mixed_int4_int8_sentence_embeddings_hold_0_99_of_fp32(minilm_int4_export):
    """The issue's line: int4 MiniLM sentence embeddings within 0.99 cosine of fp32 eager. All-int4
    g32 reaches only 0.935..0.965 (measured); the default plan keeps the costliest layers int8 per
    channel and the package stores exactly that, layer by layer. The shipped package through the
    evaluator agrees with its mixed eager reference to >= 0.999 (the lowering is faithful). The
    export (--pooling mean, every backend) is shared with tests/e2e/test_encoders.py."""
    code, summary, bundle = minilm_int4_export
    assert code == 0, summary
    manifest = read_manifest(bundle)
    [art] = [a for a in manifest["artifacts"] if a["backend"] == "coreml"]
    quantization = art["quantization"]
    overrides = quantization["overrides"]
    assert overrides and set(overrides.values()) == {"int8 per-channel sym"}
    # 6 layers x (q, k, v, attention out, intermediate, output) + word, position, token-type embeddings
    assert quantization["compressed_weight_ops"] == {"constexpr_blockwise_shift_scale": 6 * 6 + 3}
    int8 = {"p_" + n.replace(".", "_") + "_weight" for n in overrides}
    stored = _stored_weights(bundle / art["path"])
    assert len(stored) == 39 and int8 - set(stored) <= {"p_model_pooler_dense_weight"}  # unused when mean pooled
    # int4 layers on the default offset grid: uint4 codes with a float offset per block
    assert stored == {n: "int8 per-channel sym" if n in int8 else "uint4 g32 asym" for n in stored}
    assert quantization["stored_weights"] == {"int4_offset": 39 - len(int8 & set(stored)), "int8": len(int8 & set(stored))}
    assert art["bytes"] <= 1.10 * art["ideal_bytes"], (art["bytes"], art["ideal_bytes"])
    fidelity = manifest["comparisons"]["lowering_fidelity"]["coreml"]
    assert fidelity["passed"] and len(fidelity["cases"]) == 3
    for name, metrics in fidelity["cases"].items():
        assert metrics["min_cosine"] >= 0.999 and not metrics["failures"], (name, metrics)
        assert metrics["vs_fp32"]["min_cosine"] >= 0.99, (name, metrics["vs_fp32"])


@pytest.mark.slow
def test_mixed_plan_is_stored_layer_by_layer(coreml_mixed_bert, bert_dir):
    """Every layer the program uses is stored as the plan says: int8 with one scale per row for
    the overrides, int4 blocks of 32 for the rest, in one program (mean pooling drops the pooler)."""
    import coremltools as ct

    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.mixed_precision import INT8
    from edgepack.exporters.sources import load_source
    from edgepack.quant import QuantSpec

    code, summary, bundle = coreml_mixed_bert
    assert code == 0, summary
    [art] = read_manifest(bundle)["artifacts"]
    overrides = art["quantization"]["overrides"]
    captured = capture(load_source(str(bert_dir)), CaptureOptions(pooling="mean"))
    plan = QuantSpec.from_options("int4").with_overrides({n: INT8 for n in overrides}, plan={}).layers(captured.module)
    on_offset_grid = {"int4 g32": "uint4 g32 asym"}  # the default --coreml-grid offset
    expected = {"p_" + name.replace(".", "_") + "_weight": on_offset_grid.get(wq.describe(), wq.describe())
                for name, wq in plan.items() if not name.startswith("model.pooler")}
    assert _stored_weights(bundle / art["path"]) == expected and len(expected) == 15
    int8 = sum(wq == INT8 for name, wq in plan.items() if not name.startswith("model.pooler"))
    assert 0 < int8 < 15 and art["quantization"]["stored_weights"] == {"int4_offset": 15 - int8, "int8": int8}
    meta = ct.models.MLModel(str(bundle / art["path"]), skip_model_load=True).get_spec().description.metadata
    assert meta.userDefined["edgepack.compression"] == f"int4_offset + int8 per-channel ({int8} weights)"


@pytest.mark.slow
def test_mean_pooled_mixed_encoder_smokes_through_the_evaluator(coreml_mixed_bert):
    """--pooling mean puts the pooling in the program (the token count's clamp(min=1) lowers to
    clip, the sums to reduce_sum); the default fp16 package with int4 and int8 weights must replay
    its smoke cases against its mixed quantized reference. Measured on the tiny BERT: min cosine
    0.999999 vs the reference, 0.99995 vs fp32 eager (all-int4: 0.99994 and 0.992)."""
    code, summary, bundle = coreml_mixed_bert
    assert code == 0, summary
    manifest = read_manifest(bundle)
    [art] = manifest["artifacts"]
    assert art["runtime"]["op_counts"]["clip"] == 1 and art["runtime"]["op_counts"]["reduce_sum"] == 2
    assert [o["name"] for o in art["methods"][0]["outputs"]] == ["sentence_embedding"]
    fidelity = manifest["comparisons"]["lowering_fidelity"]["coreml"]
    assert fidelity["passed"] and len(fidelity["cases"]) == 3
    for name, metrics in fidelity["cases"].items():
        assert metrics["min_cosine"] >= 0.999 and not metrics["failures"], (name, metrics)
        assert metrics["vs_fp32"]["min_cosine"] >= 0.998, (name, metrics["vs_fp32"])
    result = run_cli("smoke", bundle, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"]["coreml"]["passed"]


@pytest.mark.slow
@pytest.mark.extended  # CI's 45-minute budget (the clean-clone run on an AMD EPYC host, 2026-12-02)
def test_palettes_beside_int8_layers_replay_their_read_back_reference(bert_dir, tmp_path):
    """--coreml-compression palettize4 with int8 overrides (given here, not planned): the int4
    layers become 4-bit palettes and the int8 ones linear int8, in one program, and the reference
    reads both kinds back from the package. (The tiny BERT's word and token-type tables, 500 and
    2 rows, have no whole group of 16 rows for a palette: they are among the int8 layers.)"""
    from edgepack.cases import compare, run_case, within
    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.coreml.lower import Options, lower
    from edgepack.exporters.coreml.mil import mil_evaluator_host
    from edgepack.exporters.coreml.package import write_package
    from edgepack.exporters.mixed_precision import INT8
    from edgepack.exporters.sources import load_source
    from edgepack.quant import QuantSpec

    captured = capture(load_source(str(bert_dir)), CaptureOptions(pooling="mean"))
    int8 = ("model.embeddings.word_embeddings", "model.embeddings.token_type_embeddings",
            "model.encoder.layer.1.attention.self.value")
    spec = QuantSpec.from_options("int4").with_overrides({n: INT8 for n in int8}, plan={})
    artifact = lower(captured, spec, Options(compression="palettize4"))
    assert artifact.quantization.facts["stored_weights"] == {"int8": 3, "palettize4": 12}
    assert artifact.quantization.facts["compressed_weight_ops"] == {"constexpr_blockwise_shift_scale": 3, "constexpr_lut_to_dense": 12}
    write_package({rel.removeprefix(f"{PACKAGE}/"): data for rel, data in artifact.files.items()}, tmp_path / "model.mlpackage")
    call = mil_evaluator_host(tmp_path / "model.mlpackage", {"runtime": artifact.runtime.as_dict()})
    for case in captured.cases:
        metrics = compare(artifact.reference.outputs[case.name], run_case(case, call))
        assert metrics["min_cosine"] >= 0.999 and not within(metrics, captured.tolerance), (case.name, metrics)


def test_longrope_past_its_original_length_is_refused(tmp_path):
    """LongRoPE switches to its long factors past the original length by a buffer update CoreML
    cannot convert; within it the export reads the short ones (the coverage matrix's phi3_longrope
    row), past it the export says what to give instead."""
    from demo_model.build import build_decoder_dir

    model = build_decoder_dir(tmp_path / "tiny-phi3", "phi3_longrope", max_train_steps=0)
    result = run_cli("export", model, "--target", "coreml", "--max-seq-len", "257", "--out", tmp_path / "out")
    stderr = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "LongRoPE past the model's original 256 positions (--max-seq-len 257)" in stderr, stderr
    assert "give --max-seq-len 256 or less" in stderr and not (tmp_path / "out" / model.name).exists()
