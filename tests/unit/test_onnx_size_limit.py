"""Which backends take a model past protobuf's 2 GiB of float32 weights, and how the others refuse
it, before capture, as any backend refuses a model: named in --target, an input error with what to
do; under --target all, left out and said so.

ONNX keeps the float weights in files while it rewrites the graph (a Llama-3.2-1B-shaped model
exported in 6.1 min at a 11.3 GB peak, 2.28x its float32 weights; bench.scale, 2026-12-04), so it
refuses only a model that would need more memory than the machine grants. MNN's conversion and
onnxruntime's own quantizer (--onnx-grid symmetric) read one protobuf: on such a model the export
otherwise failed after minutes with protobuf's bare "EncodeError: Failed to serialize proto"
(bench.scale, 2026-12-03)."""

from types import SimpleNamespace

import pytest
from torch import nn

from edgepack.errors import InputError
from edgepack.exporters import onnx_capture
from edgepack.exporters.onnx import lower as onnx_lower
from edgepack.exporters.onnx.options import Options
from edgepack.exporters.registry import BACKENDS
from edgepack.pipeline import backends_for
from edgepack.quant import QuantSpec

WEIGHTS = 1000 * 64 * 4  # the tied model's float32 bytes


@pytest.fixture
def loaded(monkeypatch):
    """A tied model of 64,000 weights, with the protobuf limit set just at its float32 bytes (the
    real limit needs a 2 GB model)."""
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 1000, bias=False))
    model[1].weight = model[0].weight  # tied: counted once, as the graph stores it
    monkeypatch.setattr(onnx_capture, "PROTOBUF_LIMIT", WEIGHTS)
    return SimpleNamespace(module=model)


def test_mnn_refuses_weights_past_the_protobuf_limit_onnx_does_not(loaded, monkeypatch):
    quant = QuantSpec.from_options("int4")
    assert BACKENDS["mnn"].refuses(loaded, quant).startswith(
        "the model's float32 weights are 0.00 GB, and MNN's conversion (from the ONNX graph) holds the float graph in one protobuf")
    assert BACKENDS["onnx"].refuses(loaded, quant) is None
    monkeypatch.setattr(onnx_capture, "PROTOBUF_LIMIT", WEIGHTS + 1)
    assert BACKENDS["mnn"].refuses(loaded, quant) is None


def test_onnx_refuses_a_model_that_needs_more_memory_than_the_machine_grants(loaded, monkeypatch):
    quant = QuantSpec.from_options("int4")
    need = int(onnx_lower.EXPORT_MEMORY_PER_WEIGHT_BYTE * WEIGHTS)
    monkeypatch.setattr(onnx_lower, "machine_memory_bytes", lambda: need - 1)
    reason = BACKENDS["onnx"].refuses(loaded, quant)
    assert reason.startswith("the model's float32 weights are 0.00 GB, and the ONNX export holds about 2.5x that")
    assert "killed mid-way" in reason
    monkeypatch.setattr(onnx_lower, "machine_memory_bytes", lambda: need)
    assert BACKENDS["onnx"].refuses(loaded, quant) is None


def test_a_24_gib_machine_takes_a_1b_model_on_onnx():
    """Llama-3.2-1B's shape (1.24B parameters, tied) was exported here at 11.3 GB."""
    assert onnx_lower.EXPORT_MEMORY_PER_WEIGHT_BYTE * 1_235_814_400 * 4 < 24 * 2**30


def test_the_symmetric_grid_past_the_limit_is_an_input_error_before_any_slow_step(loaded):
    for grid, refused in (("symmetric", True), ("offset", False)):
        work = onnx_lower._Work(SimpleNamespace(module=loaded.module), QuantSpec.from_options("int4"), Options(grid=grid))
        if not refused:
            onnx_lower.check_scheme(work)
            continue
        with pytest.raises(InputError) as error:
            onnx_lower.check_scheme(work)
        assert str(error.value).startswith("--onnx-grid symmetric: the model's float32 weights are 0.00 GB, and "
                                           "onnxruntime's quantizer (--onnx-grid symmetric) holds the float graph")
        assert error.value.hint == "use the default --onnx-grid offset for this model"


def test_named_in_target_it_is_an_input_error_under_all_it_is_left_out(loaded):
    quant = QuantSpec.from_options("int4")
    with pytest.raises(InputError) as refused:
        backends_for([BACKENDS["mnn"], BACKENDS["executorch"]], loaded, quant, "mnn,executorch")
    assert str(refused.value).startswith("--target mnn: the model's float32 weights are 0.00 GB")
    assert refused.value.hint == "leave mnn out of --target"
    kept, skipped = backends_for([BACKENDS["onnx"], BACKENDS["mnn"], BACKENDS["executorch"]], loaded, quant, "all")
    assert [b.name for b in kept] == ["onnx", "executorch"]
    assert [s.split(":")[0] for s in skipped] == ["mnn"]


def test_onnx_refuses_a_model_whose_weights_folder_would_not_fit_in_tmpdir(loaded, monkeypatch, tmp_path):
    """The weights stay in a folder under TMPDIR while the graph is rewritten (8 GB for a 1B model):
    a disk that cannot hold them is said before capture, with the fix, not minutes in."""
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(onnx_lower.tempfile, "tempdir", str(tmp_path))
    need = onnx_lower.WEIGHTS_FOLDER_PER_WEIGHT_BYTE * WEIGHTS
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(onnx_lower.shutil, "disk_usage",
                        lambda path: usage(1, 0, int(need) - 1) if path == str(tmp_path) else real(path))
    reason = BACKENDS["onnx"].refuses(loaded, QuantSpec.from_options("int4"))
    assert reason.startswith(f"the ONNX export keeps the model's float32 weights (0.00 GB) in a folder under {tmp_path}")
    assert reason.endswith("set TMPDIR to a folder with 0.0 GB free")
    monkeypatch.setattr(onnx_lower.shutil, "disk_usage", lambda path: usage(1, 0, int(need)))
    assert BACKENDS["onnx"].refuses(loaded, QuantSpec.from_options("int4")) is None
