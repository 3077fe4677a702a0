"""bench.run.exported_once reuses a finished export only when the same code and arguments made it:
a --work folder kept from an older checkout must not be measured as if it were this one's."""

import json
from pathlib import Path

import bench.run as run


def _fake_export(calls: list):
    """Stands in for the `edgepack export` subprocess (what is tested is the reuse decision): writes
    a manifest naming the call, as a finished export leaves one."""
    def export(hf_dir, name, out, targets, max_seq_len, prompt_len, *, extra=(), tokenizer=False):
        calls.append(targets)
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "manifest.json").write_text(json.dumps({"call": len(calls)}))
        return run.Measured(0.0, 0, 0, str(out / "log")), {}, {}
    return export


def test_reuses_only_an_export_made_by_the_same_code_and_arguments(tmp_path: Path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calls: list = []
    monkeypatch.setattr(run, "edgepack_export", _fake_export(calls))
    out = tmp_path / "work"

    assert run.exported_once(model, "m", out, "onnx", 64, 8) == {"call": 1}
    assert run.exported_once(model, "m", out, "onnx", 64, 8) == {"call": 1}  # reused
    assert run.exported_once(model, "m", out, "onnx", 128, 8) == {"call": 2}  # other arguments
    (out / "m.key").write_text("made by another checkout")
    assert run.exported_once(model, "m", out, "onnx", 128, 8) == {"call": 3}
    (out / "m.key").unlink()  # an export older than the stamps
    assert run.exported_once(model, "m", out, "onnx", 128, 8) == {"call": 4}
    (model / "config.json").write_text('{"changed": 1}')
    assert run.exported_once(model, "m", out, "onnx", 128, 8) == {"call": 5}
    assert len(calls) == 5
