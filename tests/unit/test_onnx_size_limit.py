"""A model whose float32 weights pass protobuf's 2 GiB is refused by the backends that convert from
the ONNX graph (onnx, mnn) as any backend refuses a model, before capture: named in --target, an
input error with what to do; under --target all, left out and said so. On a Llama-3.2-1B-shaped
model the export otherwise failed after minutes with protobuf's bare "EncodeError: Failed to
serialize proto" (bench.scale, 2026-12-03)."""

from types import SimpleNamespace

import pytest
from torch import nn

from edgepack.errors import InputError
from edgepack.exporters import onnx_capture
from edgepack.exporters.registry import BACKENDS
from edgepack.pipeline import backends_for
from edgepack.quant import QuantSpec


@pytest.fixture
def loaded(monkeypatch):
    """A tied model of 64,000 weights, with the limit set just at its float32 bytes (the real limit
    needs a 2 GB model)."""
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 1000, bias=False))
    model[1].weight = model[0].weight  # tied: counted once, as the graph stores it
    monkeypatch.setattr(onnx_capture, "PROTOBUF_LIMIT", 1000 * 64 * 4)
    return SimpleNamespace(module=model)


def test_onnx_and_mnn_refuse_weights_past_the_limit(loaded, monkeypatch):
    quant = QuantSpec.from_options("int4")
    for name in ("onnx", "mnn"):
        assert "float32 weights are 0.00 GB" in BACKENDS[name].refuses(loaded, quant)
    assert BACKENDS["executorch"].refuses(loaded, quant) is None
    monkeypatch.setattr(onnx_capture, "PROTOBUF_LIMIT", 1000 * 64 * 4 + 1)
    assert BACKENDS["onnx"].refuses(loaded, quant) is None and BACKENDS["mnn"].refuses(loaded, quant) is None


def test_named_in_target_it_is_an_input_error_under_all_it_is_left_out(loaded):
    quant = QuantSpec.from_options("int4")
    with pytest.raises(InputError) as refused:
        backends_for([BACKENDS["onnx"], BACKENDS["executorch"]], loaded, quant, "onnx,executorch")
    assert str(refused.value).startswith("--target onnx: the model's float32 weights are 0.00 GB")
    assert refused.value.hint == "leave onnx out of --target"
    kept, skipped = backends_for([BACKENDS["onnx"], BACKENDS["mnn"], BACKENDS["executorch"]], loaded, quant, "all")
    assert [b.name for b in kept] == ["executorch"]
    assert [s.split(":")[0] for s in skipped] == ["onnx", "mnn"]
