"""`make bench --quick` end to end (issue 7): the script that produces the committed benchmark must
keep working. It runs ExecuTorch's real export_llm and edgepack's real export on a small model of
the benchmark's architecture, times both on the ExecuTorch runtime, and writes the JSON and chart.
Marked extended (`make test-extended`): its four exports and timed runs took 5 minutes of CI's
45-minute budget."""

from __future__ import annotations

import json
import os

import pytest

from bench.run import TARGETS, run

pytestmark = [pytest.mark.slow, pytest.mark.extended]


def test_quick_bench_measures_both_tools_side_by_side(tmp_path):
    # The LiteRT-LM engine row exports the real model (~7 min): test_litertlm_engine_row.
    report = run(quick=True, out_dir=tmp_path / "results", work=tmp_path / "work", other_backends=True, engine=False)
    written = json.loads((tmp_path / "results" / "s135-quick.json").read_text())
    assert written == json.loads(json.dumps(report))
    png = (tmp_path / "results" / "s135-quick.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    model, et = report["model"], report["executorch"]
    for tool in ("edgepack", "export_llm"):
        numbers = et[tool]
        assert numbers["export_exit_code"] == 0
        assert numbers["export_wall_s"] > 0 and numbers["export_peak_rss_bytes"] > 100e6
        runs = model["executorch_rounds"] * model["executorch_repeats_a_round"]  # the two .pte files taking turns
        assert len(numbers["decode_tokens_per_s_runs"]) == runs and numbers["decode_tokens_per_s"] > 0
        # both artifacts are the same random-weight model quantized to 4 bits: close to fp32, not equal
        assert 0.85 < numbers["cosine_vs_fp32"]["mean"] < 0.9999, numbers["cosine_vs_fp32"]
        # a tiny model carries fixed overheads (metadata, delegate headers), yet stays near the ideal
        assert model["ideal_bytes"] < numbers["pte_bytes"] < 2.5 * model["ideal_bytes"]
    assert et["edgepack"]["attention"] == "llama::custom_sdpa + llama::update_cache"
    # the sizes the ratios are made of are the files on disk
    assert et["export_llm"]["pte_bytes"] == (tmp_path / "work" / "export_llm" / "model.pte").stat().st_size
    assert et["edgepack"]["pte_bytes"] == (tmp_path / "work" / "edgepack" / model["name"] / "executorch" / "model.pte").stat().st_size
    assert set(report["ratios"]) == {metric for metric, _, _ in TARGETS} | {"cosine_vs_fp32"}
    cosine = report["ratios"]["cosine_vs_fp32"]
    assert cosine["met"] == (et["edgepack"]["cosine_vs_fp32"]["mean"] >= et["export_llm"]["cosine_vs_fp32"]["mean"])

    others = report["other_backends"]
    assert others["export_exit_code"] == 0
    for backend in ("tflite", "coreml", "onnx"):
        assert model["ideal_bytes"] < others[backend]["bytes"] < 3 * model["ideal_bytes"], backend
        assert others[backend]["lower_s"] > 0
    for backend in ("tflite", "onnx"):
        assert others[backend]["cosine_vs_fp32"]["mean"] > 0.85 and others[backend]["decode_tokens_per_s"] > 0
    assert "tflite (LiteRT-LM engine)" not in others


def test_litertlm_engine_row(tmp_path):
    """The .tflite in the engine Android apps embed (the real SmolLM2-135M with a .litertlm): its
    speed through the engine's own Benchmark, beside a given ExecuTorch decode speed, and the
    engine's own greedy check reported with it, never dropped (it can fail on this model)."""
    import numpy as np

    from bench.run import litertlm_engine

    tokens = tmp_path / "tokens.npy"  # a 32-token prompt and 64 decode steps, as make bench's run
    np.save(tokens, np.random.default_rng(0).integers(3, 49152, size=96).astype(np.int64))
    engine = litertlm_engine(tmp_path, tokens, 512, 32, 3, executorch_decode=100.0)
    assert engine["decode_tokens_per_s"] > 0 and len(engine["decode_tokens_per_s_runs"]) == 3
    assert engine["threads"] == os.cpu_count()  # one a core, as ExecuTorch's runtime takes, not the engine's default 4
    assert engine["decode_vs_executorch"] == round(engine["decode_tokens_per_s"] / 100.0, 3)
    # Stored as make bench's .pte (every layer int4, symmetric): 77.1 MB on 2026-12-06, where the
    # default plan's offset grid and int8 layers make 82.9 MB.
    assert 70e6 < engine["bytes"] < 80e6, engine["bytes"]
    assert engine["engine_check"] == "pass" or engine["engine_check"].startswith("FAIL: the engine"), engine
