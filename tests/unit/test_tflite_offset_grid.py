"""TFLite's offset grid without an export: a layer's split into a symmetric part and int8-stored
offsets keeps a Q4_1-style source, its edge blocks stay loadable, codes pack as TFLite stores int4,
and the split layer computes the grid's own linear map."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepack.exporters.tflite.offset_grid import (
    SMALLEST_SCALE,
    OffsetLinear,
    OffsetTable,
    _image,
    _packed,
    _parts,
    split_layers,
)
from edgepack.exporters.weights import quantize_min_max
from edgepack.quant import WeightQuant


def _on_grid(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A weight already on the offset grid with bf16 scales: minimum + scale·q, q in 0..15 with both ends used."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    scale = (torch.rand(rows, cols // 32, 1, generator=g) * 0.01 + 0.001).to(torch.bfloat16).float()
    minimum = (torch.randn(rows, cols // 32, 1, generator=g) * 0.02).to(torch.bfloat16).float()
    return (minimum + scale * q).reshape(rows, cols)


def test_a_source_on_the_grid_is_split_back_exactly():
    weight = _on_grid(24, 128)
    offsets, codes, scale = _parts(weight, 32)
    symmetric = _image(codes, scale)
    assert codes.min() == -8 and codes.max() == 7  # all 16 levels: -8 is what ai_edge_quantizer's own rounding loses
    rebuilt = symmetric + offsets.repeat_interleave(32, dim=1)
    torch.testing.assert_close(rebuilt, weight, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(symmetric.numpy(), (codes.reshape(24, 4, 32) * scale[..., None]).reshape(24, 128))
    assert (scale.astype(np.float16).astype(np.float32) == scale).all()  # what store_codes writes, exactly


def test_constant_and_tiny_blocks_stay_loadable():
    weight = _on_grid(2, 64)
    weight[0, :32] = 0.25  # a constant block: XNNPACK refuses its scale 0
    weight[1, 32:] = torch.linspace(0, 1e-4, 32)  # a step under fp16's normal range
    offsets, codes, scale = _parts(weight, 32)
    symmetric = _image(codes, scale)
    assert scale[0, 0] == 1 and not codes[0, :32].any() and offsets[0, 0] == 0.25
    assert scale[1, 1] == SMALLEST_SCALE
    rebuilt = symmetric + offsets.repeat_interleave(32, dim=1)
    assert (rebuilt[0, :32] == 0.25).all()
    assert (rebuilt[1, 32:] - weight[1, 32:]).abs().max() <= SMALLEST_SCALE / 2 + 1e-9


def test_int4_codes_pack_low_nibble_first_in_twos_complement():
    assert _packed(np.array([-8, 7, -1, 0, 3], np.int8)).tobytes() == bytes([0x78, 0x0F, 0x03])


def test_split_layers_compute_the_grid_and_put_the_originals_back(tmp_path):
    """A tied table and LM head split once (one W_sym and one M shared), the linear's bias kept in
    the offsets part, each split layer computing x·Wᵀ + b with W the grid's image of its weight once
    it holds the grid. Each symmetric part holds its layer's own weight, never a copy: the converter
    reads it only for the op's layout, then the grid is written over it in place, the weight saved
    in a file until restore puts it back bit for bit (a float copy of a 1B model is 4.6 GiB)."""
    model = nn.Module()
    model.embed, model.head, model.proj = nn.Embedding(10, 64), nn.Linear(64, 10, bias=False), nn.Linear(64, 8)
    model.head.weight = model.embed.weight
    four = WeightQuant(4, 32)
    originals = dict(model.named_children())
    weights = {name: layer.weight.detach().clone() for name, layer in originals.items()}
    split = split_layers(model, {"embed": four, "head": four, "proj": four})
    assert isinstance(model.embed, OffsetTable) and isinstance(model.head, OffsetLinear) and isinstance(model.proj, OffsetLinear)
    assert all(getattr(model, name).symmetric.weight is layer.weight for name, layer in originals.items())
    grids = [names for names, _, _ in split.hold_grid(tmp_path)]  # as store_codes takes them
    assert grids == [["embed.symmetric", "head.symmetric"], ["proj.symmetric"]]
    assert all(getattr(model, name).symmetric.weight is layer.weight for name, layer in originals.items())
    assert len(list(tmp_path.iterdir())) == 2  # the tied table once, and the linear
    assert model.embed.offsets.weight is model.head.offsets.weight
    assert model.proj.offsets.bias is originals["proj"].bias
    assert sorted(split.offsets) == ["embed.offsets", "head.offsets", "proj.offsets"]
    x = torch.randn(3, 64)
    for name, layer in originals.items():
        q, scale, minimum = quantize_min_max(weights[name], 4, 32, scale_dtype=torch.bfloat16)
        image = (minimum + scale * q).reshape(layer.weight.shape)
        if name == "embed":
            torch.testing.assert_close(model.embed(torch.arange(10)), image, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(getattr(model, name)(x), nn.functional.linear(x, image, layer.bias), rtol=1e-5, atol=1e-5)
    split.restore()
    assert dict(model.named_children()) == originals
    assert all(torch.equal(layer.weight, weights[name]) for name, layer in originals.items())  # every backend's capture


def test_a_weight_a_layer_off_the_grid_holds_too_gets_its_own_symmetric_part():
    """Gemma's scaled table stays on the symmetric grid while its tied LM head is split: sharing
    the table's weight would make the quantizer store the two as one, and the head's codes would
    then be written over the table (Gemma 2 and 3 failed their TFLite smoke that way)."""

    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = nn.Module()
    model.embed, model.head = ScaledEmbedding(10, 64), nn.Linear(64, 10, bias=False)
    model.head.weight = model.embed.weight
    table = model.embed.weight
    split_layers(model, {"embed": WeightQuant(4, 32), "head": WeightQuant(4, 32)})
    assert isinstance(model.head, OffsetLinear) and model.embed.weight is table
    offsets, codes, scale = _parts(table, 32)
    assert model.head.symmetric.weight is not table and torch.equal(model.head.symmetric.weight, _image(codes, scale))


def test_a_weight_that_cannot_be_read_back_stops_the_run_and_the_others_are_put_back(tmp_path):
    """The capture is every backend's: a saved weight that is gone by the end of the lowering
    (its temporary folder swept, a disk error) leaves that weight rounded, so restore says which
    and raises CaptureAltered (the pipeline stops on it); every weight it can read is put back."""
    import pytest

    from edgepack.errors import CaptureAltered

    model = nn.Module()
    model.first, model.second = nn.Linear(64, 8), nn.Linear(64, 8)
    weights = {name: layer.weight.detach().clone() for name, layer in model.named_children()}
    split = split_layers(model, {"first": WeightQuant(4, 32), "second": WeightQuant(4, 32)})
    for _ in split.hold_grid(tmp_path):
        pass
    lost = sorted(tmp_path.iterdir())[0]
    lost.unlink()
    with pytest.raises(CaptureAltered, match=f"could not read back 1 of the model's weights.*{lost.name}"):
        split.restore()
    assert isinstance(model.first, nn.Linear) and isinstance(model.second, nn.Linear)
    _, codes, scale = _parts(weights["first"], 32)
    assert torch.equal(model.first.weight, _image(codes, scale))  # W_sym, whole
    assert torch.equal(model.second.weight, weights["second"])
