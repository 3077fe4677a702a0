"""The TFLite backend on the real converter (litert_torch), quantizer (ai_edge_quantizer), runtime
(ai_edge_litert) and metadata schema (tflite-support)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepack.cases import compare, run_case
from edgepack.packaging.manifest import read_manifest
from tests.conftest import REPO_ROOT, offset_grid_weights, run_cli


def _interpreter(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path))


@pytest.mark.slow
def test_bundle_has_prefill_and_decode_signatures(tflite_export):
    code, summary, bundle = tflite_export
    assert code == 0, summary
    signatures = _interpreter(bundle / "tflite/model.tflite").get_signature_list()
    assert set(signatures) == {"prefill_4", "prefill_8", "decode"}
    caches = {f"kv_cache_{k}_{i}" for i in range(2) for k in "kv"}
    assert set(signatures["decode"]["inputs"]) == {"tokens", "input_pos"} | caches
    assert set(signatures["decode"]["outputs"]) == {"logits"} | caches
    assert set(signatures["prefill_8"]["outputs"]) == caches
    [art] = read_manifest(bundle)["artifacts"]
    assert [m["name"] for m in art["methods"]] == ["prefill_4", "prefill_8", "decode"]
    # tensor names are module paths (write_metadata shortens the converter's scope paths), unique
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray((bundle / "tflite/model.tflite").read_bytes())
    for graph in model.subgraphs:
        names = [t.name.decode() for t in graph.tensors]
        assert len(set(names)) == len(names)
        assert not [n for n in names if "transformers." in n or "torch.nn." in n or "edgepack." in n], max(names, key=len)
        assert any(name.startswith("model.model.1.self_attn.") for name in names)
    # a weight the three signatures read is one buffer, and its quantization one table (write_metadata)
    from ai_edge_litert import schema_py_generated as schema

    raw = schema.Model.GetRootAs((bundle / "tflite/model.tflite").read_bytes())
    tables: dict[int, set[int]] = {}
    for g in range(raw.SubgraphsLength()):
        for t in map(raw.Subgraphs(g).Tensors, range(raw.Subgraphs(g).TensorsLength())):
            if t.Quantization() is not None and t.Quantization().ScaleLength() > 0 and t.Buffer() > 0:
                tables.setdefault(t.Buffer(), set()).add(t.Quantization()._tab.Pos)
    assert len(tables) > 10 and all(len(positions) == 1 for positions in tables.values()), tables


@pytest.mark.slow
def test_smoke_matches_the_quantized_reference_token_for_token(tflite_export):
    bundle = tflite_export[2]
    fidelity = read_manifest(bundle)["comparisons"]["lowering_fidelity"]["tflite"]
    greedy = fidelity["cases"]["greedy"]
    assert fidelity["passed"] and greedy["tokens_match"] and greedy["min_cosine"] >= 0.99
    result = run_cli("smoke", bundle, "--json")
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_weights_are_4bit_and_near_the_ideal_size(tflite_export):
    from ai_edge_litert.tools import flatbuffer_utils

    [art] = read_manifest(tflite_export[2])["artifacts"]
    runtime = art["runtime"]
    assert runtime["quantized_bytes"] < runtime["float_bytes"]
    model = flatbuffer_utils.read_model_from_bytearray((tflite_export[2] / art["path"]).read_bytes())
    constants = sum(len(b.data) for b in model.buffers if b.data is not None)
    # Every constant (4-bit weights with their scales and offsets, tied and shared across signatures
    # stored once; norms; rotary tables) within 30% of the ideal 4-bit weights. The rest of the file
    # is the graph of three signatures, which outweighs the weights of this tiny model.
    assert constants <= 1.3 * art["ideal_bytes"], (constants, art["ideal_bytes"])


@pytest.mark.slow
def test_the_offset_grid_is_stored_exactly(tflite_export, llama_dir):
    """The default --tflite-grid offset on a decoder: each 4-bit linear's symmetric part is stored
    as int4 blocks holding the grid's own codes and scales bit for bit (codes at -8 included,
    which ai_edge_quantizer's rounding of the same floats could not keep), and its offsets as
    int8 per channel within half a step of the blocks' midpoints."""
    from edgepack.exporters.tflite.offset_grid import _image, _parts
    from edgepack.exporters.tflite.weights import stored_weights

    [art] = read_manifest(tflite_export[2])["artifacts"]
    assert art["quantization"]["grid"] == "offset"
    stored = stored_weights((tflite_export[2] / art["path"]).read_bytes(), "FULLY_CONNECTED")
    by_shape: dict = {}
    for w in stored:
        by_shape.setdefault(w.values.shape, []).append(w)
        np.testing.assert_array_equal(w.rows(slice(1, 3)), w.values[1:3])  # how weights are compared, a slice at a time
    # the weights the fit to the calibration text left (it runs under --mixed-precision off too)
    linears = {n: torch.from_numpy(w) for n, w in offset_grid_weights(llama_dir).items() if n.endswith("proj.weight")}
    lowest = 0
    for name, weight in linears.items():
        offsets, codes, scale = _parts(weight, 32)
        symmetric = _image(codes, scale)
        lowest = min(lowest, int(codes.min()))
        assert any(np.array_equal(w.values, symmetric.numpy()) for w in by_shape[tuple(symmetric.shape)]), name
        step = offsets.abs().amax(dim=1, keepdim=True).numpy() / 127
        assert any(np.all(np.abs(w.values - offsets.numpy()) <= step / 2 + 1e-7) for w in by_shape[tuple(offsets.shape)]), name
    assert lowest == -8
    assert {w.storage.describe() for w in stored} == {"int4 g32", "int8 per-channel sym"}


@pytest.mark.slow
def test_metadata_and_tokenizer_read_back_from_the_tflite(tflite_export):
    from edgepack.exporters.tflite.metadata import FACTS_FILE, read_metadata

    bundle = tflite_export[2]
    manifest = read_manifest(bundle)
    read = read_metadata((bundle / "tflite/model.tflite").read_bytes())
    meta = read["metadata"]
    assert meta["name"] == manifest["name"] and meta["version"] and meta["author"] and meta["license"]
    [subgraph] = meta["subgraph_metadata"]
    assert [t["name"] for t in subgraph["input_tensor_metadata"]][:2] == ["tokens", "input_pos"]
    tok = manifest["tokenizer"]
    facts = read["facts"]["tokenizer"]
    assert (facts["bos_id"], facts["eos_ids"], facts["chat_template"]) == (tok["bos_id"], tok["eos_ids"], tok["chat_template"])
    for f in tok["files"]:
        assert read["files"][Path(f["path"]).name] == (bundle / f["path"]).read_bytes()
    assert set(read["files"]) == {Path(f["path"]).name for f in tok["files"]} | {FACTS_FILE}
    text = run_cli("inspect", bundle)
    assert text.exit_code == 0 and "tflite tokenizer" in text.stdout


@pytest.mark.slow
def test_minilm_int4_mixed_precision_follows_its_reference_and_fp32(minilm_int4_export):
    """The real MiniLM-L6 at --quant int4 with mean pooling (the shared export of every backend):
    mixed precision plans some layers int8 (the rest int4 g32), the .tflite stores each as planned,
    and on the LiteRT interpreter it follows its reference and the issue's line, sentence
    embeddings >= 0.99 cosine from fp32. The converter folds each LayerNorm's γ and β (and
    attention's 1/sqrt(d), split onto q and k) into the 24 linear layers it feeds before quantizing,
    and folds the position and token-type lookups (fixed at the signature's length) into float
    constants the quantizer never sees, whatever the plan says for them; the reference reads both
    back from the file. Measured 2026-11-23 (37 of 40 layers int8, 18.9 MB = 1.07x ideal): 1.0000
    against the reference, 0.9963 / 0.9971 / 0.9950 against fp32 (all-int4: 0.95-0.97)."""
    code, summary, bundle = minilm_int4_export
    assert code == 0, summary
    manifest = read_manifest(bundle)
    [art] = [a for a in manifest["artifacts"] if a["backend"] == "tflite"]
    quant, runtime = art["quantization"], art["runtime"]
    assert quant["linear"].startswith("int4 g32") and quant["overrides"] and art["bytes"] < 1.1 * art["ideal_bytes"]
    assert len(runtime["folded_norms"]) == 24
    float_tables = ["model.embeddings.position_embeddings", "model.embeddings.token_type_embeddings"]
    assert runtime["float_embeddings"] == float_tables
    planned = {name: quant["overrides"].get(name, quant["embedding" if "embeddings" in name else "linear"])
               for name in runtime["stored_weights"]}
    assert runtime["stored_weights"] == planned and len(planned) == 37  # 36 linears and the word table
    assert {"int4 g32", "int8 per-channel sym"} == set(planned.values())
    cases = manifest["comparisons"]["lowering_fidelity"]["tflite"]["cases"]
    assert len(cases) == 3
    for name, metrics in cases.items():
        assert metrics["min_cosine"] >= 0.998 and not metrics["failures"], (name, metrics)
        assert metrics["vs_fp32"]["min_cosine"] >= 0.99, (name, metrics["vs_fp32"])


# Layers the mixed test stores int8 (the rest int4 g32): the word table (an EMBEDDING_LOOKUP), the
# position table (folded to a float constant by the converter: stays float), q with its norm and
# 1/sqrt(d) folded in, the MLP input with its norm folded in, and two linears no norm feeds.
MIXED_INT8 = ("model.embeddings.word_embeddings", "model.embeddings.position_embeddings",
              "model.encoder.layer.0.attention.self.query", "model.encoder.layer.0.intermediate.dense",
              "model.encoder.layer.1.attention.output.dense", "model.encoder.layer.1.output.dense")


def test_mixed_precision_stores_each_layer_as_planned_and_follows_its_reference(bert_dir, tmp_path):
    """A hand-made int4 / int8 plan on the tiny BERT through lower(): the .tflite read back stores
    every layer at its planned bits and granularity, and on the LiteRT interpreter it reproduces
    its quantized reference (measured 2026-11-23: cosine 1.000000, max |diff| 0.0 on all cases)."""
    from collections import Counter

    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.mixed_precision import INT8
    from edgepack.exporters.registry import BACKENDS
    from edgepack.exporters.sources import load_source
    from edgepack.exporters.tflite import lower as tflite
    from edgepack.exporters.tflite.weights import stored_weights
    from edgepack.quant import QuantSpec

    captured = capture(load_source(str(bert_dir)), CaptureOptions(pooling="mean"))
    spec = QuantSpec.from_options("int4").with_overrides({name: INT8 for name in MIXED_INT8}, plan={"by": "test"})
    art = tflite.lower(captured, spec, tflite.Options())
    path = tmp_path / "model.tflite"
    path.write_bytes(art.files[tflite.MODEL_FILE])

    planned = spec.layers(captured.module)
    unused = {"model.pooler.dense"}  # mean pooling never reads the pooler: no op holds it
    float_tables = ["model.embeddings.position_embeddings", "model.embeddings.token_type_embeddings"]
    assert art.runtime.facts["float_embeddings"] == float_tables
    assert art.runtime.facts["stored_weights"] == {name: wq.describe() for name, wq in planned.items()
                                             if name not in unused | set(float_tables)}
    # The file itself, independently of how the backend maps ops to layers: as many FULLY_CONNECTED
    # weights of each storage as the plan has linears, and the word table int8 per channel.
    model = path.read_bytes()
    linears = Counter(wq for name, wq in planned.items() if name not in unused and "embeddings" not in name)
    assert Counter(w.storage for w in stored_weights(model, "FULLY_CONNECTED")) == linears
    assert linears[INT8] == 4 and linears[spec.linear] == 8
    assert [w.storage for w in stored_weights(model, "EMBEDDING_LOOKUP")] == [INT8]

    call = BACKENDS["tflite"].host_call(path, {"methods": [m.as_dict() for m in art.methods]})
    for case in captured.cases:
        metrics = compare(art.reference.outputs[case.name], run_case(case, call))
        assert metrics["min_cosine"] >= 0.998, (case.name, metrics)


def test_every_backend_imports_in_one_process():
    code = ("import importlib; from edgepack.exporters.registry import BACKENDS; "
            "[importlib.import_module(b.lower) for b in BACKENDS.values()]; "
            "import edgepack.exporters.tflite.metadata, edgepack.exporters.tflite.runtime")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_litertlm_bundle_holds_the_model_tokenizer_and_stop_tokens(tflite_export, llama_dir):
    import zlib

    from google.protobuf import text_format
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    from edgepack.exporters.tflite.litertlm import read_litertlm

    bundle = tflite_export[2]
    manifest = read_manifest(bundle)
    [art] = manifest["artifacts"]
    assert art["runtime"]["litertlm"] == "tflite/model.litertlm"
    sections = read_litertlm((bundle / "tflite/model.litertlm").read_bytes())
    # the same model, its tokenizer packed once (the .litertlm's own section), not also inside the .tflite
    from ai_edge_litert.tools import flatbuffer_utils

    from edgepack.exporters.tflite.metadata import FACTS_FILE, read_metadata

    inner, shipped = sections["Section1_TFLiteModel_tf_lite_prefill_decode.tflite"], (bundle / "tflite/model.tflite").read_bytes()
    assert set(read_metadata(inner)["files"]) == {FACTS_FILE} and "tokenizer.json" in read_metadata(shipped)["files"]
    assert len(shipped) - len(inner) >= (llama_dir / "tokenizer.json").stat().st_size
    models = [flatbuffer_utils.read_model_from_bytearray(m) for m in (inner, shipped)]
    weights = [[bytes(b.data) for i, b in enumerate(m.buffers) if b.data is not None and i not in {e.buffer for e in m.metadata}]
               for m in models]
    assert weights[0] == weights[1] and len(weights[0]) > 10
    assert [len(g.operators) for g in models[0].subgraphs] == [len(g.operators) for g in models[1].subgraphs]
    packed = sections["Section2_HF_Tokenizer_Zlib.zlib"]  # 8-byte size, then zlib
    assert zlib.decompress(packed[8:]) == (llama_dir / "tokenizer.json").read_bytes()
    meta = text_format.Parse(sections["LlmMetadataProto.pbtext"].decode(), llm_metadata_pb2.LlmMetadata())
    assert [t.token_ids.ids[0] for t in meta.stop_tokens] == manifest["tokenizer"]["eos_ids"]
    assert meta.start_token.token_ids.ids[0] == manifest["tokenizer"]["bos_id"]
    assert meta.max_num_tokens == manifest["generation"]["max_seq_len"]
    assert meta.jinja_prompt_template == manifest["tokenizer"]["chat_template"]
    assert "creation_timestamp, Value (String): 1980-01-01" in sections["report"]  # reproducible bytes


def test_a_planned_layer_without_an_op_of_its_own_is_refused(bert_dir):
    """A plan naming a layer the converted model holds no op for (here the pooler, which mean
    pooling never reads) cannot be followed: the export says so instead of storing the default."""
    from edgepack.errors import BackendError
    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.mixed_precision import INT8
    from edgepack.exporters.sources import load_source
    from edgepack.exporters.tflite import lower as tflite
    from edgepack.quant import QuantSpec

    captured = capture(load_source(str(bert_dir)), CaptureOptions(pooling="mean"))
    spec = QuantSpec.from_options("int4").with_overrides({"model.pooler.dense": INT8}, plan={"by": "test"})
    with pytest.raises(BackendError, match="1 planned layer.*model.pooler.dense"):
        tflite.lower(captured, spec, tflite.Options())


@pytest.mark.slow
def test_litertlm_answers_on_the_litert_lm_engine_token_for_token(tflite_export):
    """`edgepack smoke` runs the .litertlm on the LiteRT-LM engine (the runtime Android apps load it
    with): its greedy answer, through its own tokenizer and start/stop tokens, is the reference's."""
    import json

    import numpy as np
    from tokenizers import Tokenizer

    _, summary, bundle = tflite_export
    [artifact] = summary["artifacts"]  # checked at export too, and part of its verdict
    assert artifact["companions"]["litertlm"]["passed"] and artifact["companions"]["litertlm"]["cases"]["greedy"]["steps_matched"] == 16
    result = run_cli("smoke", bundle, "--json")
    assert result.exit_code == 0, result.output
    engine = json.loads(result.stdout)["results"]["litertlm"]
    assert engine["runtime"] == "LiteRT-LM engine (host)" and engine["passed"], engine
    greedy = engine["cases"]["greedy"]
    want = np.load(bundle / "smoke/greedy/expected.tflite.tokens.npy").reshape(-1).tolist()
    assert greedy["steps_matched"] == greedy["steps"] == len(want) == 16
    # the same text (the engine answers in text; re-tokenized, two of its tokens may merge into one)
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json"))
    assert tokenizer.decode(greedy["tokens"]) == tokenizer.decode(want)


@pytest.mark.slow
def test_the_engine_check_fails_a_litertlm_with_a_wrong_start_token(tflite_export, tmp_path):
    """The engine prepends the bundle's start token itself: one that is not the tokenizer's BOS
    (here the first stop token) changes what the model sees on a device, and the check says so
    (this tiny model's greedy answer happens not to change, so the tokens alone would not)."""
    from edgepack.exporters.tflite.litertlm import build_litertlm
    from edgepack.exporters.tflite.litertlm_engine import greedy_on_engine
    from edgepack.packaging.smoke import expected_output, golden_cases

    bundle = tflite_export[2]
    manifest = read_manifest(bundle)
    tok = manifest["tokenizer"]
    wrong = tmp_path / "model.litertlm"
    wrong.write_bytes(build_litertlm((bundle / "tflite/model.tflite").read_bytes(), bundle / "tokenizer",
                                     tuple(Path(f["path"]).name for f in tok["files"]), bos_id=tok["eos_ids"][0],
                                     eos_ids=tuple(tok["eos_ids"]), max_seq_len=manifest["generation"]["max_seq_len"],
                                     chat_template=None, name="wrong-start"))
    cases = [(case, expected_output(bundle, refs["tflite"]), None) for case, refs in golden_cases(bundle, manifest)]
    verdicts = greedy_on_engine(wrong, cases, tok["bos_id"], tok["eos_ids"], tmp_path)
    assert f"the engine prepends start token {tok['eos_ids'][0]}, the tokenizer's BOS is {tok['bos_id']}" in \
        verdicts["greedy"]["failures"], verdicts


@pytest.mark.slow
@pytest.mark.parametrize("grid", ["offset", "symmetric"])
def test_an_all_zero_weight_block_still_loads_in_xnnpack(llama_dir, tmp_path, grid):
    """A weight row of zeros (a pad token's embedding, tied to the LM head) gets scale 0 from
    ai_edge_quantizer (int4 blocks on the symmetric grid, the int8 offsets' channel on the offset
    grid), which XNNPACK refuses: the export writes scale 1.0 over its zero codes (the offset
    grid's own blocks never take scale 0), and the artifact loads and passes its smoke test with
    that row still exactly zero."""
    import shutil

    from safetensors.torch import load_file, save_file

    from edgepack.exporters.tflite.weights import stored_weights

    model = shutil.copytree(llama_dir, tmp_path / "zero-row")
    weights = load_file(str(model / "model.safetensors"))
    weights["model.embed_tokens.weight"][3] = 0.0
    save_file(weights, str(model / "model.safetensors"))
    result = run_cli("export", model, "--target", "tflite", "--mixed-precision", "off", "--prefill-len", "8",
                     "--tflite-grid", grid, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    tflite = (tmp_path / "out" / "zero-row" / "tflite" / "model.tflite").read_bytes()
    heads = [w for w in stored_weights(tflite, "FULLY_CONNECTED") if w.values.shape[0] == weights["model.embed_tokens.weight"].shape[0]]
    assert heads and all(not w.values[3].any() and w.values[2].any() for w in heads)

