"""Which backends take a model past protobuf's 2 GiB of float32 weights, and how a backend refuses
a model this machine cannot export, before capture, as any backend refuses a model: named in
--target, an input error with what to do; under --target all, left out and said so.

ONNX and MNN keep the exported graph's float weights in files (export_onnx's weights_dir), so
neither stops at the protobuf limit: a Llama-3.2-1B-shaped model exported to ONNX in 3.7 min at a
10.64 GiB peak, 2.31x its float32 weights, and to MNN at 2.73x (bench.scale, 2026-12-04). Each
refuses only a model that would need more memory than the machine grants, or more free disk under
TMPDIR than there is. Both int4 grids store their blocks from those files (graph.store_int4_blocks;
until 2026-12-07 --onnx-grid symmetric ran onnxruntime's own quantizer, which reads one protobuf,
and was refused past the limit)."""

import shutil
import tempfile
from collections import namedtuple
from types import SimpleNamespace

import pytest
from torch import nn

from edgepack.errors import InputError
from edgepack.exporters import weights as shared_weights
from edgepack.exporters.mnn import lower as mnn_lower
from edgepack.exporters.onnx import lower as onnx_lower
from edgepack.exporters.registry import BACKENDS
from edgepack.exporters.tflite import lower as tflite_lower
from edgepack.pipeline import backends_for
from edgepack.quant import QuantSpec

WEIGHTS = 1000 * 64 * 4  # the tied model's float32 bytes
LOWERINGS = {"onnx": onnx_lower, "mnn": mnn_lower}


@pytest.fixture
def loaded():
    """A tied model of 64,000 weights."""
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 1000, bias=False))
    model[1].weight = model[0].weight  # tied: counted once, as the graph stores it
    return SimpleNamespace(module=model)


def test_onnx_and_mnn_take_weights_past_the_protobuf_limit(loaded):
    quant = QuantSpec.from_options("int4")
    assert BACKENDS["onnx"].refuses(loaded, quant) is None and BACKENDS["mnn"].refuses(loaded, quant) is None


@pytest.mark.parametrize("name", ["onnx", "mnn"])
def test_refused_where_the_export_needs_more_memory_than_the_machine_grants(loaded, monkeypatch, name):
    quant, lowering = QuantSpec.from_options("int4"), LOWERINGS[name]
    need = int(lowering.EXPORT_MEMORY_PER_WEIGHT_BYTE * WEIGHTS)
    monkeypatch.setattr(lowering, "machine_memory_bytes", lambda: need - 1)
    reason = BACKENDS[name].refuses(loaded, quant)
    assert reason.startswith(f"the model's float32 weights are 0.00 GB, and the {name.upper()} export holds about "
                             f"{lowering.EXPORT_MEMORY_PER_WEIGHT_BYTE:g}x that")
    assert "killed mid-way" in reason
    monkeypatch.setattr(lowering, "machine_memory_bytes", lambda: need)
    assert BACKENDS[name].refuses(loaded, quant) is None


@pytest.mark.parametrize(("name", "what"), [("onnx", "the ONNX export"), ("mnn", "the MNN export"),
                                            ("tflite", "the TFLite conversion")])
def test_refused_where_tmpdir_cannot_hold_the_weights_folder(loaded, monkeypatch, tmp_path, name, what):
    """The weights stay in a folder under TMPDIR while the export works (8 GB for a 1B model on
    ONNX; TFLite's float .tflite, then the offset grid's saved weights, 5 GB): a disk that cannot
    hold them is said before capture, with the fix, not minutes in."""
    lowering = {**LOWERINGS, "tflite": tflite_lower}[name]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    need = lowering.WEIGHTS_FOLDER_PER_WEIGHT_BYTE * WEIGHTS
    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    monkeypatch.setattr(shared_weights.shutil, "disk_usage",
                        lambda path: usage(1, 0, int(need) - 1) if path == str(tmp_path) else real(path))
    reason = BACKENDS[name].refuses(loaded, QuantSpec.from_options("int4"))
    assert reason.startswith(f"{what} keeps the model's float32 weights (0.00 GB) in a folder under {tmp_path}")
    assert reason.endswith("set TMPDIR to a folder with 0.0 GB free")
    monkeypatch.setattr(shared_weights.shutil, "disk_usage", lambda path: usage(1, 0, int(need)))
    assert BACKENDS[name].refuses(loaded, QuantSpec.from_options("int4")) is None


def test_a_24_gib_machine_takes_a_1b_model_on_onnx_and_mnn():
    """Llama-3.2-1B's shape (1.24B parameters, tied) was exported here at 10.64 GiB (ONNX) and
    10.93 GiB (MNN)."""
    for lowering in LOWERINGS.values():
        assert lowering.EXPORT_MEMORY_PER_WEIGHT_BYTE * 1_235_814_400 * 4 < 24 * 2**30


def test_named_in_target_it_is_an_input_error_under_all_it_is_left_out(loaded, monkeypatch):
    quant = QuantSpec.from_options("int4")
    monkeypatch.setattr(mnn_lower, "machine_memory_bytes", lambda: 1)
    with pytest.raises(InputError) as refused:
        backends_for([BACKENDS["mnn"], BACKENDS["executorch"]], loaded, quant, "mnn,executorch")
    assert str(refused.value).startswith("--target mnn: the model's float32 weights are 0.00 GB")
    assert refused.value.hint == "leave mnn out of --target"
    kept, skipped = backends_for([BACKENDS["onnx"], BACKENDS["mnn"], BACKENDS["executorch"]], loaded, quant, "all")
    assert [b.name for b in kept] == ["onnx", "executorch"]
    assert [s.split(":")[0] for s in skipped] == ["mnn"]
