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


@pytest.mark.parametrize("flatbuffer", ["in memory", "written as it goes"])
def test_refused_where_the_conversion_needs_more_than_the_machine_grants(loaded, monkeypatch, flatbuffer):
    """A model whose float flatbuffer passes 2 GiB is converted at a lower ratio: litert-torch then
    writes its weights to the file as it goes (2.11x at Llama-3.2-1B's shape, 3.85x at 360M's)."""
    if flatbuffer == "written as it goes":
        monkeypatch.setattr(tflite_lower, "FLATBUFFER_LIMIT", WEIGHTS)
    quant = QuantSpec.from_options("int4")
    need = int(tflite_lower.CONVERSION_MEMORY_PER_WEIGHT_BYTE[flatbuffer] * WEIGHTS)
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


def test_a_laptop_takes_smollm2_360m_and_this_machine_a_2b_model():
    """SmolLM2-360M (1.45 GB of float32 weights) converted here at a 5.2 GiB peak and a
    Llama-3.2-1B shape (4.94 GB) at 9.7 GiB: a 16 GiB machine must not refuse the first, nor a
    24 GiB one a model of 2B parameters."""
    ratios = tflite_lower.CONVERSION_MEMORY_PER_WEIGHT_BYTE
    assert ratios["in memory"] * 361_821_120 * 4 < 16 * 2**30
    assert ratios["written as it goes"] * 2_000_000_000 * 4 < 24 * 2**30
