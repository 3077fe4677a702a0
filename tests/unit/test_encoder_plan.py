"""The encoder precision plan on its own (no export): overrides, the bisection, the floor, and
calibration files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgepack.cases import row_cosines
from edgepack.exporters.mixed_precision import INT8, _fewest, plan_mixed_precision, read_calibration
from edgepack.exporters.tokenizer import encode
from edgepack.exporters.weights import Rounding, int8_per_row, weight_only_reference
from edgepack.quant import QuantSpec


def test_overrides_change_how_named_layers_are_stored():
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 32), nn.Linear(32, 16))
    spec = QuantSpec.from_options("int4", 32).with_overrides({"1": INT8}, plan={"floor": 0.99})
    assert spec.for_layer("1", model[1]) == INT8 and spec.for_layer("2", model[2]) == spec.linear
    assert spec.layers(model) == {"0": spec.embedding, "1": INT8, "2": spec.linear}
    assert spec.describe()["overrides"] == {"1": "int8 per-channel sym"} and spec.describe()["plan"] == {"floor": 0.99}
    # int4 g32: 4 bits + a 16-bit scale per 32 weights; int8 per channel: 8 bits + a scale per row; biases fp32
    assert spec.ideal_bytes(model) == int((100 * 64 + 32 * 16) * 4.5 / 8 + 32 * 64 + 32 * 2 + (32 + 16) * 4)
    assert QuantSpec.from_options("int4").describe().keys() == {"scheme", "linear", "embedding", "activations"}


def test_fewest_bisects_to_the_smallest_k_that_holds():
    calls = []
    assert _fewest(lambda k: calls.append(k) or k >= 7, 20) == 7 and len(calls) <= 6
    assert _fewest(lambda k: False, 20) == 20


def test_calibration_file_errors_are_input_errors(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("one\n\ntwo\n")
    with pytest.raises(Exception, match="2 non-empty line"):
        read_calibration(short)
    with pytest.raises(Exception, match="no such file"):
        read_calibration(tmp_path / "missing.txt")
    texts, source = read_calibration(None)
    assert len(texts) == 40 and source.startswith("built-in")


def _calibration_cosines(captured, spec) -> np.ndarray:
    """The plan's claim re-measured by other code: the weight-only reference on the planning grid,
    with int8 dynamic activations on every linear layer."""
    texts, _ = read_calibration(None)
    reference = weight_only_reference(captured.module, spec, lambda bits: Rounding.symmetric(bits, narrow=True))
    for layer in reference.modules():
        if isinstance(layer, nn.Linear):
            layer.register_forward_pre_hook(lambda _, args: (int8_per_row(args[0]),))
    with torch.no_grad():
        cosines = []
        for text in texts:
            ids = torch.tensor([encode(captured.loaded.tokenizer, text)])
            mask = torch.ones_like(ids)
            cosines += row_cosines(captured.module(ids, mask).numpy(), reference(ids, mask).numpy())
    return np.array(cosines)


def test_plan_keeps_int8_only_what_the_floor_needs(tiny_bert_capture):
    int4 = QuantSpec.from_options("int4")
    all_int4 = _calibration_cosines(tiny_bert_capture, int4).min()
    floor = round(float(1 - (1 - all_int4) / 4), 4)  # four times less error than all-int4
    spec = plan_mixed_precision(tiny_bert_capture, int4, *read_calibration(None), floor)
    plan = spec.plan
    assert plan["all_int4_min_cosine"] == pytest.approx(all_int4, abs=1e-5)
    assert plan["unused_layers"] == ["model.pooler.dense"]  # mean pooling never calls it
    assert 0 < plan["int8_layers"] < plan["int8_layers"] + plan["int4_layers"] == len(int4.layers(tiny_bert_capture.module)) - 1
    assert set(spec.overrides.values()) == {INT8} and plan["floor_met"] and plan["target_met"]
    assert plan["target"] == pytest.approx(floor + (1 - floor) / 2)
    measured = _calibration_cosines(tiny_bert_capture, spec)
    assert measured.min() >= plan["target"] and plan["planned_min_cosine"] == pytest.approx(measured.min(), abs=1e-5)
    # a floor whose target all-int4 already meets keeps everything int4
    lenient = plan_mixed_precision(tiny_bert_capture, int4, *read_calibration(None), float(2 * all_int4 - 1) - 1e-3)
    assert not lenient.overrides and lenient.plan["int4_weight_fraction"] == 1.0

