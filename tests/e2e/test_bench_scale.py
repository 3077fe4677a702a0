"""bench.scale (`make bench BENCH_ARGS=--scale`, issue 18) on a tiny shape: the script whose full
run takes an hour keeps working. One real export to ONNX (~1 min), so it runs in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.models import QUICK

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_scale_measures_each_export(tmp_path, monkeypatch, request, with_tokenizer):
    """bench.scale (`make bench BENCH_ARGS=--scale`) on a tiny shape: each export's exit code, time,
    stages and peak RSS against its fp32 weights are recorded, and the chart is written. With
    --tokenizer (here the demo Llama's, 512 tokens) the export runs the precision plan and the
    quality stage, as a real model's does."""
    from bench import run, scale

    monkeypatch.setitem(scale.SHAPES, "tiny", dict(QUICK))
    out = tmp_path / "scale.json"
    tokenizer = request.getfixturevalue("llama_dir") if with_tokenizer else None
    report = scale.run(["tiny"], ["onnx"], tmp_path / "work", with_export_llm=False, out=out, tokenizer=tokenizer)
    assert json.loads(out.read_text()) == report
    row = report["sizes"]["tiny"]
    assert row["params_tied_once"] == 2048 * 128 + 2 * (128 * (128 + 64 + 64 + 128) + 3 * 128 * 256 + 2 * 128) + 128
    export = row["exports"]["onnx"]
    assert export["exit_code"] == 0 and export["artifact_bytes"] > 0
    assert {"load", "capture", "lower onnx"} <= set(export["stages"])
    assert {"plan precision", "quality"} <= set(export["stages"]) if with_tokenizer else "plan precision" not in export["stages"]
    assert ("tokenizer, so the precision plan and quality stage included" in report["what"]) == with_tokenizer
    assert run._last_json(Path(export["log"]))["cache"] is None  # every stage ran: none read from the stage cache
    lowering = export["stages"]["lower onnx"]
    assert set(lowering["step_peak_rss_bytes"]) == set(lowering["steps"])  # where in the lowering the memory went
    # the process tree holds Python, torch and onnxruntime: far more than this model's 1.3 MB of weights
    assert export["peak_rss_bytes"] > 200 * 2**20
    assert export["peak_rss_vs_fp32_weights"] == round(export["peak_rss_bytes"] / row["fp32_weight_bytes"], 2)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "work" / "tiny").exists()  # the model's files freed once exported
