"""A model whose float32 weights pass protobuf's 2 GiB is refused before the ONNX trace, with what
to do instead; on a Llama-3.2-1B-shaped model the export otherwise failed after minutes with
protobuf's bare "EncodeError: Failed to serialize proto" (bench.scale, 2026-12-03)."""

import pytest
from torch import nn

from edgepack.errors import UnsupportedModelError
from edgepack.exporters.onnx_capture import check_fits_one_protobuf


def test_refuses_weights_past_the_limit_and_says_what_to_do():
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 1000, bias=False))
    model[1].weight = model[0].weight  # tied: counted once, as the graph stores it
    weights = 1000 * 64 * 4
    check_fits_one_protobuf(model, limit=weights + 1)
    with pytest.raises(UnsupportedModelError) as refused:
        check_fits_one_protobuf(model, limit=weights)
    assert "float32 weights are 0.00 GB" in str(refused.value)
    assert "--target that does not convert from an ONNX graph" in refused.value.hint

