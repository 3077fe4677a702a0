"""CoreML backend: .mlpackage export through the real coremltools, checked on Linux by the numpy
evaluator of the MIL program read back from the saved package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepack.errors import InputError
from edgepack.exporters.coreml.mil import MilFunction, load_program
from edgepack.exporters.coreml.mil_ops import OPS, UnsupportedMilOp
from edgepack.packaging.bundle import directory_digest
from edgepack.packaging.manifest import read_manifest
from tests.conftest import LLAMA_BACKEND_OPTIONS, export_json, run_cli

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


# ---------------------------------------------------------------- tiny Llama: the stateful LM


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
def test_offset_grid_blocks_span_each_float_blocks_range(coreml_llama, llama_dir):
    """Each stored block, decompressed by coremltools itself, spans its float block's [min, max]
    (codes 0 and 15, up to fp16 rounding), and every weight is within half a step of its float
    value: the grid a Q4_1 source is already on."""
    from edgepack.exporters.sources import load_source

    program = load_program(coreml_llama[2] / PACKAGE)
    weights = [p.detach().numpy() for p in load_source(str(llama_dir)).module.parameters() if p.ndim == 2]
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


@pytest.mark.parametrize("values, word", [({"ios_target": 16}, "ios-target"), ({"precision": "bf16"}, "precision"),
                                          ({"compression": "int3"}, "compression"),
                                          ({"grid": "asymmetric"}, "grid")])
def test_bad_coreml_options_are_input_errors(values, word):
    from edgepack.exporters.coreml.lower import Options

    with pytest.raises(InputError, match=word):
        Options(**values)


# ---------------------------------------------------------------- MiniLM: real weights


@pytest.mark.slow
@pytest.mark.extended  # CoreML is in the shared MiniLM export of make test-extended only (conftest.minilm_targets)
def test_minilm_mixed_int4_int8_sentence_embeddings_hold_0_99_of_fp32(minilm_int4_export):
    """The issue's line: int4 MiniLM sentence embeddings within 0.99 cosine of fp32 eager. All-int4
    g32 reaches only 0.935..0.965 (measured); the default plan keeps the costliest layers int8 per
    channel and the package stores exactly that, layer by layer. The shipped package through the
    evaluator agrees with its mixed eager reference to >= 0.999 (the lowering is faithful). The
    export (--pooling mean, every backend) is shared with tests/test_encoders.py."""
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
    on_offset_grid = {"int4 g32 sym": "uint4 g32 asym"}  # the default --coreml-grid offset
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
    assert artifact.quantization["stored_weights"] == {"int8": 3, "palettize4": 12}
    assert artifact.quantization["compressed_weight_ops"] == {"constexpr_blockwise_shift_scale": 3, "constexpr_lut_to_dense": 12}
    write_package({rel.removeprefix(f"{PACKAGE}/"): data for rel, data in artifact.files.items()}, tmp_path / "model.mlpackage")
    call = mil_evaluator_host(tmp_path / "model.mlpackage", {"runtime": artifact.runtime})
    for case in captured.cases:
        metrics = compare(artifact.reference_outputs[case.name], run_case(case, call))
        assert metrics["min_cosine"] >= 0.999 and not within(metrics, captured.tolerance), (case.name, metrics)


def test_fp16_rms_norm_is_rescaled_so_large_activations_do_not_overflow():
    """RMSNorm squares its input, and x² overflows fp16 once |x| > 256: the real SmolLM2-135M's
    residual stream reaches ~620, so its plain fp16 norms return 0 (rsqrt(inf)) and every logit
    was 0. The fp16 export rewrites each norm as rsqrt(mean((x/m)²) + eps/m²) / m, m = max(max|x|, 1):
    the fp16 program then answers like torch for spiky, ordinary, tiny and all-zero rows alike."""
    import coremltools as ct
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from edgepack.exporters.coreml.lower import _fp16_safe_rms_norms

    norm = LlamaRMSNorm(8, eps=1e-5).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.tensor([[[620.0, -3, 1, 0.5, -2, 4, 0.25, 1],     # one huge value: x² = 384400 > 65504
                       [3, -1.5, 2, 0.5, -2, 1, 0.75, -1],       # ordinary
                       [1e-3, -2e-3, 5e-4, 0, 1e-3, 0, -1e-3, 2e-3],  # max|x| < 1: not rescaled
                       [0, 0, 0, 0, 0, 0, 0, 0]]])               # eps alone
    expected = norm(x).detach().numpy()

    def fp16_output(rewrite: bool) -> np.ndarray:
        program = torch.export.export(norm, (x,)).run_decompositions({})
        if rewrite:
            assert _fp16_safe_rms_norms(program) == 1
            np.testing.assert_allclose(program.module()(x).detach().numpy(), expected, rtol=1e-6, atol=1e-6)
        mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                             compute_precision=ct.precision.FLOAT16, skip_model_load=True)
        function = MilFunction(mlmodel._mil_program.functions["main"])
        [out] = function({function.input_names[0]: x.numpy()})
        return np.asarray(out, dtype=np.float32)

    with np.errstate(over="ignore"):
        plain = fp16_output(rewrite=False)
    assert not plain[0, 0].any()  # the overflow: the spiky row normalized to zeros
    rescaled = fp16_output(rewrite=True)
    assert np.isfinite(rescaled).all()
    np.testing.assert_allclose(rescaled, expected, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- the evaluator, op by op


def _run(prog, **inputs):
    return MilFunction(prog.functions["main"])(inputs)


def _program(build, *specs):  # two inputs, named x and y
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    (x, x_type), (y, y_type) = specs

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=x_type), mb.TensorSpec(shape=y.shape, dtype=y_type)],
                opset_version=ct.target.iOS18)
    def prog(x, y):
        return build(mb, x, y)
    return prog


RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3, 4)).astype(np.float32)
Y = RNG.standard_normal((2, 3, 4)).astype(np.float32)
W = RNG.standard_normal((5, 4)).astype(np.float32)
B = RNG.standard_normal(5).astype(np.float32)
T = torch.from_numpy


# op type -> (build(mb, x, y), reference(x, y) in torch): x, y are X and Y above, both fp32
OP_CASES = {
    "add": (lambda mb, x, y: mb.add(x=x, y=y), lambda x, y: x + y),
    "sub": (lambda mb, x, y: mb.sub(x=x, y=y), lambda x, y: x - y),
    "mul": (lambda mb, x, y: mb.mul(x=x, y=y), lambda x, y: x * y),
    "real_div": (lambda mb, x, y: mb.real_div(x=x, y=y), lambda x, y: x / y),
    "pow": (lambda mb, x, y: mb.pow(x=x, y=2.0), lambda x, y: x ** 2),
    "minimum": (lambda mb, x, y: mb.minimum(x=x, y=y), torch.minimum),
    "maximum": (lambda mb, x, y: mb.maximum(x=x, y=y), torch.maximum),
    "abs": (lambda mb, x, y: mb.abs(x=x), lambda x, y: x.abs()),
    # two-sided, and one-sided as mean pooling's clamp(min=1) of the token count lowers
    "clip": (lambda mb, x, y: mb.add(x=mb.clip(x=x, alpha=-0.5, beta=0.5), y=mb.clip(x=y, alpha=0.25, beta=np.finfo(np.float32).max)),
             lambda x, y: x.clamp(-0.5, 0.5) + y.clamp(min=0.25)),
    "equal": (lambda mb, x, y: mb.cast(x=mb.equal(x=x, y=x), dtype="fp32"), lambda x, y: (x == x).float()),
    "less_equal": (lambda mb, x, y: mb.cast(x=mb.less_equal(x=x, y=y), dtype="fp32"), lambda x, y: (x <= y).float()),
    "greater": (lambda mb, x, y: mb.cast(x=mb.greater(x=x, y=y), dtype="fp32"), lambda x, y: (x > y).float()),
    "greater_equal": (lambda mb, x, y: mb.cast(x=mb.greater_equal(x=x, y=y), dtype="fp32"), lambda x, y: (x >= y).float()),
    "logical_and": (lambda mb, x, y: mb.cast(x=mb.logical_and(x=mb.greater_equal(x=x, y=0.0), y=mb.greater_equal(x=y, y=0.0)), dtype="fp32"),
                    lambda x, y: ((x >= 0) & (y >= 0)).float()),
    "select": (lambda mb, x, y: mb.select(cond=mb.less_equal(x=x, y=y), a=x, b=y), lambda x, y: torch.where(x <= y, x, y)),
    "rsqrt": (lambda mb, x, y: mb.rsqrt(x=mb.mul(x=x, y=x), epsilon=1e-6), lambda x, y: torch.rsqrt(x * x + 1e-6)),
    "sin": (lambda mb, x, y: mb.sin(x=x), lambda x, y: torch.sin(x)),
    "cos": (lambda mb, x, y: mb.cos(x=x), lambda x, y: torch.cos(x)),
    "tanh": (lambda mb, x, y: mb.tanh(x=x), lambda x, y: torch.tanh(x)),  # Gemma's logit soft-capping
    "silu": (lambda mb, x, y: mb.silu(x=x), lambda x, y: torch.nn.functional.silu(x)),
    "gelu": (lambda mb, x, y: mb.gelu(x=x), lambda x, y: torch.nn.functional.gelu(x)),
    "cast": (lambda mb, x, y: mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32"), lambda x, y: x.half().float()),
    "reduce_mean": (lambda mb, x, y: mb.reduce_mean(x=x, axes=[-1], keep_dims=True), lambda x, y: x.mean(-1, keepdim=True)),
    # keep_dims defaults to False; with no axes every axis is reduced (a scalar)
    "reduce_sum": (lambda mb, x, y: mb.add(x=mb.reduce_sum(x=x, axes=[1]), y=mb.reduce_sum(x=y)), lambda x, y: x.sum(1) + y.sum()),
    # the fp16 RMSNorm rewrite's max|x| over the normalized axes
    "reduce_max": (lambda mb, x, y: mb.reduce_max(x=x, axes=[-1], keep_dims=True), lambda x, y: x.amax(-1, keepdim=True)),
    "softmax": (lambda mb, x, y: mb.softmax(x=x, axis=-1), lambda x, y: x.softmax(-1)),
    "layer_norm": (lambda mb, x, y: mb.layer_norm(x=x, axes=[-1], gamma=Y[0, 0], beta=Y[1, 1], epsilon=1e-5),
                   lambda x, y: torch.nn.functional.layer_norm(x, (4,), y[0, 0], y[1, 1], 1e-5)),
    "linear": (lambda mb, x, y: mb.linear(x=x, weight=W, bias=B), lambda x, y: x @ T(W).T + T(B)),
    "matmul": (lambda mb, x, y: mb.matmul(x=x, y=y, transpose_y=True), lambda x, y: x @ y.transpose(-1, -2)),
    "shape": (lambda mb, x, y: mb.cast(x=mb.shape(x=x), dtype="fp32"), lambda x, y: torch.tensor(x.shape, dtype=torch.float32)),
    # iOS17+ rule: a 0 copies the input dim at the same position counted from the right
    "reshape": (lambda mb, x, y: mb.reshape(x=x, shape=[0, -1]), lambda x, y: x.reshape(x.shape[1], -1)),
    "expand_dims": (lambda mb, x, y: mb.expand_dims(x=x, axes=[1]), lambda x, y: x.unsqueeze(1)),
    "transpose": (lambda mb, x, y: mb.transpose(x=x, perm=[2, 0, 1]), lambda x, y: x.permute(2, 0, 1)),
    "tile": (lambda mb, x, y: mb.tile(x=x, reps=[1, 2, 1]), lambda x, y: x.repeat(1, 2, 1)),
    "concat": (lambda mb, x, y: mb.concat(values=[x, y], axis=-1), lambda x, y: torch.cat([x, y], -1)),
    "stack": (lambda mb, x, y: mb.stack(values=[x, y], axis=1), lambda x, y: torch.stack([x, y], 1)),
    # GPT-2's fused qkv: equal parts (num_splits) and explicit sizes
    "split": (lambda mb, x, y: mb.add(x=mb.split(x=x, num_splits=2, axis=-1)[1], y=mb.split(x=y, split_sizes=[1, 3], axis=-1)[0]),
              lambda x, y: x[..., 2:] + y[..., :1]),
    "slice_by_index": (lambda mb, x, y: mb.slice_by_index(x=x, begin=[0, 1, 0], end=[2, 0, -1], end_mask=[True, True, False],
                                                          squeeze_mask=[False, False, False]),
                       lambda x, y: x[:, 1:, :-1]),
    "gather": (lambda mb, x, y: mb.gather(x=x, indices=np.array([2, 0], dtype=np.int32), axis=1), lambda x, y: x[:, [2, 0]]),
    "gather_nd": (lambda mb, x, y: mb.gather_nd(x=x, indices=np.array([[1, 2], [0, 0]], dtype=np.int32)), lambda x, y: x[[1, 0], [2, 0]]),
    "gather_along_axis": (lambda mb, x, y: mb.gather_along_axis(x=x, indices=np.zeros((2, 3, 1), dtype=np.int32) + 3, axis=2),
                          lambda x, y: x[..., 3:4]),
    "range_1d": (lambda mb, x, y: mb.add(x=x, y=mb.cast(x=mb.range_1d(start=0, end=4, step=1), dtype="fp32")),
                 lambda x, y: x + torch.arange(4.0)),
}
# Ops whose own test is below (states, slice_update, compressed weights)
SEPARATELY_TESTED = {"read_state", "coreml_update_state", "slice_update", "constexpr_blockwise_shift_scale",
                     "constexpr_lut_to_dense", "constexpr_affine_dequantize"}


def test_every_implemented_op_has_a_test():
    assert set(OP_CASES) | SEPARATELY_TESTED == set(OPS)


@pytest.mark.parametrize("op_type", sorted(OP_CASES))
def test_evaluator_op_matches_torch(op_type):
    from coremltools.converters.mil.mil import types

    build, reference = OP_CASES[op_type]
    prog = _program(build, (X, types.fp32), (Y, types.fp32))
    assert op_type in {op.op_type for op in prog.functions["main"].operations}
    [out] = _run(prog, x=X, y=Y)
    np.testing.assert_allclose(out, reference(T(X), T(Y)).numpy(), rtol=1e-5, atol=1e-5)


def test_evaluator_carries_states_and_slice_updates_between_calls():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.StateTensorSpec((1, 4, 2), dtype=types.fp16), mb.TensorSpec((1, 1, 2), dtype=types.fp16),
                             mb.TensorSpec((3,), dtype=types.int32)], opset_version=ct.target.iOS18)
    def prog(cache, x, begin):
        current = mb.read_state(input=cache)
        updated = mb.slice_update(x=current, update=x, begin=begin, end=mb.add(x=begin, y=[1, 1, 2]))
        return mb.coreml_update_state(state=cache, value=updated)

    function = MilFunction(prog.functions["main"])
    x0, x2 = np.array([[[1, 2]]], np.float16), np.array([[[3, 4]]], np.float16)
    function({"x": x0, "begin": np.array([0, 0, 0], np.int32)})
    [out] = function({"x": x2, "begin": np.array([0, 2, 0], np.int32)})
    expected = np.zeros((1, 4, 2), np.float16)
    expected[0, 0], expected[0, 2] = x0[0, 0], x2[0, 0]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(function.states["cache"].value, expected)


def test_evaluator_decompresses_int4_blocks_int8_channels_and_palettes_like_coremltools():
    """The constexpr ops against coremltools' own decompression (materialized values), int4
    blocks and int8 channels in one program as a mixed-precision plan stores them."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    data = RNG.integers(-7, 8, size=(4, 64)).astype(np.int8)
    scale = RNG.random((4, 2)).astype(np.float16)
    channels = RNG.integers(-127, 128, size=(3, 64)).astype(np.int8)
    channel_scales = RNG.random((3, 1)).astype(np.float16)
    indices = RNG.integers(0, 16, size=(4, 8)).astype(np.uint8)
    lut = RNG.standard_normal((2, 1, 16, 1)).astype(np.float16)
    quantized = RNG.integers(-127, 128, size=(3, 5)).astype(np.int8)
    channel_scale = RNG.random(3).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1,), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):
        blocks = mb.constexpr_blockwise_shift_scale(data=mb.const(val=data.astype(types.np_int4_dtype)), scale=scale)
        rows = mb.constexpr_blockwise_shift_scale(data=channels, scale=channel_scales)
        palette = mb.constexpr_lut_to_dense(indices=mb.const(val=indices.astype(types.np_uint4_dtype)), lut=lut)
        return blocks, rows, palette

    function = MilFunction(prog.functions["main"])
    decompressed = [op for op in prog.functions["main"].operations if op.op_type.startswith("constexpr_")]
    assert [types.builtin_to_string(op.data.dtype) for op in decompressed[:2]] == ["int4", "int8"]
    for op in decompressed:
        np.testing.assert_array_equal(function.constants[op.outputs[0].name], op.materialized_val_inference())
    from edgepack.exporters.coreml.mil_ops import affine_dequantize
    np.testing.assert_allclose(affine_dequantize(quantized, np.int8(0), channel_scale, 0),
                               quantized * channel_scale[:, None], rtol=1e-6)


def test_evaluator_names_every_unknown_op_type():
    from coremltools.converters.mil.mil import types

    prog = _program(lambda mb, x, y: mb.atan(x=mb.erf(x=x)), (X, types.fp32), (Y, types.fp32))
    with pytest.raises(UnsupportedMilOp, match="atan, erf"):
        MilFunction(prog.functions["main"])
