"""TFLite refuses a model whose conversion would need more memory than the machine grants, as any
backend refuses a model, before capture: named in --target, an input error; under --target all,
left out and said so. A Llama-3.2-1B-shaped model was otherwise killed by the kernel, with no
message, in the lowering, 8 minutes into the export at a 23.4 GB peak on this 24 GiB machine (bench.scale,
2026-12-03)."""

from types import SimpleNamespace

import pytest
from torch import nn

from edgepack.errors import InputError
from edgepack.exporters.registry import BACKENDS
from edgepack.exporters.tflite import lower as tflite_lower
from edgepack.pipeline import backends_for
from edgepack.quant import QuantSpec

WEIGHTS = 1000 * 64 * 4  # the tied model's float32 bytes


@pytest.fixture
def loaded():
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 1000, bias=False))
    model[1].weight = model[0].weight  # tied: counted once, as the float graph stores it
    return SimpleNamespace(module=model)


def grant(monkeypatch, memory: int) -> None:
    monkeypatch.setattr(tflite_lower, "machine_memory_bytes", lambda: memory)


def test_refused_where_the_conversion_needs_more_than_the_machine_grants(loaded, monkeypatch):
    quant = QuantSpec.from_options("int4")
    need = int(tflite_lower.CONVERSION_MEMORY_PER_WEIGHT_BYTE * WEIGHTS)
    grant(monkeypatch, need - 1)
    reason = BACKENDS["tflite"].refuses(loaded, quant)
    assert reason.startswith("the model's float32 weights are 0.00 GB, and the TFLite conversion holds about")
    assert "killed mid-way" in reason
    assert BACKENDS["executorch"].refuses(loaded, quant) is None
    grant(monkeypatch, need)
    assert BACKENDS["tflite"].refuses(loaded, quant) is None


def test_named_in_target_it_is_an_input_error_under_all_it_is_left_out(loaded, monkeypatch):
    quant = QuantSpec.from_options("int4")
    grant(monkeypatch, 1)
    with pytest.raises(InputError) as refused:
        backends_for([BACKENDS["tflite"], BACKENDS["executorch"]], loaded, quant, "tflite,executorch")
    assert str(refused.value).startswith("--target tflite: the model's float32 weights")
    assert refused.value.hint == "leave tflite out of --target"
    kept, skipped = backends_for([BACKENDS["tflite"], BACKENDS["executorch"]], loaded, quant, "all")
    assert [b.name for b in kept] == ["executorch"] and [s.split(":")[0] for s in skipped] == ["tflite"]


def test_a_laptop_takes_smollm2_135m():
    """SmolLM2-135M (0.54 GB of float32 weights) converted here at a 4.5 GB peak: a 16 GiB machine
    must not refuse it."""
    assert tflite_lower.CONVERSION_MEMORY_PER_WEIGHT_BYTE * 134_515_008 * 4 < 16 * 2**30
