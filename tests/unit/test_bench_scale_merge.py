"""bench.scale --merge: the reports of partial scale runs joined into one report and chart."""

from __future__ import annotations

import json

from bench import scale


def _report(date: str, commit: str, sizes: dict) -> dict:
    return {"what": "w", "ran": {"sizes": list(sizes)}, "date": date, "versions": {"edgepack": commit},
            "machine": {"cores": 2}, "sizes": sizes}


def _export(exit_code: int, wall_s: float) -> dict:
    return {"exit_code": exit_code, "wall_s": wall_s, "peak_rss_bytes": 2**30, "peak_rss_vs_fp32_weights": 2.0}


def _row(params: int, exports: dict) -> dict:
    return {"params_tied_once": params, "fp32_weight_bytes": 4 * params, "exports": exports}


def test_merge_joins_sizes_and_backends_the_later_report_winning(tmp_path):
    first = tmp_path / "a.json"
    first.write_text(json.dumps(_report("2026-12-01", "aaa", {
        "l1b": _row(1236, {"onnx": _export(2, 30.0)}),
        "s135": _row(135, {"executorch": _export(0, 600.0), "tflite": _export(0, 400.0)})})))
    second = tmp_path / "b.json"
    second.write_text(json.dumps(_report("2026-12-03", "bbb", {"s135": _row(135, {"tflite": _export(0, 250.0)})})))

    out = tmp_path / "scale.json"
    report = scale.merge([first, second], out)

    assert json.loads(out.read_text()) == report
    assert list(report["sizes"]) == ["s135", "l1b"]  # SHAPES' order, smallest first
    s135 = report["sizes"]["s135"]["exports"]
    assert s135["tflite"]["wall_s"] == 250.0 and s135["tflite"]["report"] == "b.json"
    assert s135["executorch"]["report"] == "a.json"
    assert report["sizes"]["l1b"]["exports"]["onnx"]["exit_code"] == 2  # kept in the table, not on the curves
    assert [m["edgepack"] for m in report["merged_from"]] == ["aaa", "bbb"] and report["date"] == "2026-12-03"
    assert [m["machine"] for m in report["merged_from"]] == [{"cores": 2}, {"cores": 2}]  # each run's own host
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
