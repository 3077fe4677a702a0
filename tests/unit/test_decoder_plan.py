"""The decoder LM precision plan on its own (no export): int8 where int4 costs the calibration loss
most per stored bit, within a bits-per-weight budget, checked against the loss it claims to lower
(measured by other code); the budget's bounds; each grid planned at its own bits."""

from __future__ import annotations

import pytest
import torch

from demo_model.build import decoder_config
from edgepack.exporters.capture import CaptureOptions, capture
from edgepack.exporters.decoder_precision import _chunks, _fisher, plan_decoder_precision, stored_bits
from edgepack.exporters.mixed_precision import INT8, read_calibration
from edgepack.exporters.sources import load_source
from edgepack.exporters.weights import OffsetGrid, Rounding, fake_quantize, weight_only_reference
from edgepack.quant import QuantSpec
from tests.conftest import REPO_ROOT

INT4 = QuantSpec.from_options("int4", 32)


# The text the tiny Llama was fitted on: its losses there mean something (on the built-in multilingual
# calibration texts its loss is ~10.7 nats, worse than uniform over its 512 tokens, and which of two
# roundings scores lower there is noise that changes with the CPU the model was trained on).
CALIBRATION = read_calibration(REPO_ROOT / "demo_model" / "corpus.txt")


@pytest.fixture(scope="module")
def tiny_llama_capture(llama_dir):
    return capture(load_source(str(llama_dir)), CaptureOptions())


def _plan(captured, budget, grid="symmetric"):
    return plan_decoder_precision(captured, INT4, *CALIBRATION, budget, (grid,))[grid]


def _bits_per_weight(captured, spec, grid="symmetric") -> float:
    """Stored bits per quantized weight, a tied weight once, as the plan's budget counts them."""
    seen, bits, numel = set(), 0.0, 0
    for name, wq in spec.layers(captured.module).items():
        weight = captured.module.get_submodule(name).weight
        if id(weight) not in seen:
            seen.add(id(weight))
            bits += weight.numel() * stored_bits(wq, weight.shape[1], grid)
            numel += weight.numel()
    return bits / numel


@torch.no_grad()
def _calibration_loss(captured, spec) -> float:
    """Mean next-token loss (nats) on the calibration text of the model with its weights rounded
    as `spec` says on the planning grid (None: fp32)."""
    model = captured.loaded.module
    if spec is not None:
        model = weight_only_reference(captured.module, spec, lambda bits: Rounding.symmetric(bits, narrow=True)).model
    chunks = _chunks(captured, CALIBRATION[0])
    total = sum(torch.nn.functional.cross_entropy(model(input_ids=c).logits[0, :-1], c[0, 1:], reduction="sum") for c in chunks)
    return float(total) / sum(c.shape[1] - 1 for c in chunks)


def test_plan_spends_the_budget_on_the_weights_that_cost_the_loss_most(tiny_llama_capture):
    captured = tiny_llama_capture
    before = {k: v.clone() for k, v in captured.loaded.module.state_dict().items()}
    flags = {k: p.requires_grad for k, p in captured.loaded.module.named_parameters()}
    planned = _plan(captured, 5.0)
    plan = planned.plan
    # the budget holds, counted independently, and the plan says what it spent
    assert 4.5 < _bits_per_weight(captured, planned) <= 5.0
    assert plan["bits_per_weight"] == pytest.approx(_bits_per_weight(captured, planned), abs=1e-4)
    assert set(planned.overrides.values()) == {INT8} and plan["int8_layers"] == len(planned.overrides) > 0
    assert plan["int8_layer_names"] == sorted(planned.overrides)
    # a tied embedding / LM head is one weight: both int8 or neither
    tied = {"model.model.embed_tokens", "model.lm_head"}
    assert len(tied & set(planned.overrides)) in (0, 2)
    # the loss it claims to lower, measured by other code: lower than all int4, and lower than the
    # same budget spent the other way round (the weights it left int4 made int8 instead)
    fp32, all_int4, measured = (_calibration_loss(captured, s) for s in (None, INT4, planned))
    assert fp32 < measured < all_int4, (fp32, measured, all_int4)
    assert plan["estimated_loss_planned"] < plan["estimated_loss_all_int4"]
    left = [n for n in INT4.layers(captured.module) if n not in planned.overrides and n not in tied]
    inverse = INT4
    for name in left:  # as many of them int8 as the budget allows
        wider = INT4.with_overrides({**inverse.overrides, name: INT8}, {})
        if _bits_per_weight(captured, wider) <= 5.0:
            inverse = wider
    assert inverse.overrides and measured < _calibration_loss(captured, inverse)
    # the model the plan read is left as it was
    assert all(torch.equal(v, captured.loaded.module.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad == flags[k] and p.grad is None for k, p in captured.loaded.module.named_parameters())


def test_budget_bounds_keep_all_int4_or_make_everything_that_helps_int8(tiny_llama_capture):
    assert not _plan(tiny_llama_capture, 4.5).overrides
    everything = _plan(tiny_llama_capture, 8.5)
    assert set(everything.overrides) == set(INT4.layers(tiny_llama_capture.module))
    # what int8 leaves is a small fraction of what int4 costs
    assert everything.plan["estimated_loss_planned"] < everything.plan["estimated_loss_all_int4"] / 50


def test_each_grid_is_planned_at_its_own_bits_and_a_source_on_the_offset_grid_stays_int4(llama_dir):
    """The offset grid stores a scale and an offset per block (5 bits a weight at g32): the same
    budget buys fewer int8 layers than on the symmetric grid (4.5). A source whose weights already
    sit on the offset grid (as a Q4_1 GGUF's do) loses nothing there, so nothing is worth int8."""
    captured = capture(load_source(str(llama_dir)), CaptureOptions())
    plans = plan_decoder_precision(captured, INT4, *read_calibration(None), 5.5, ("offset", "symmetric"))
    offset, symmetric = plans["offset"], plans["symmetric"]
    assert _bits_per_weight(captured, INT4, "offset") == pytest.approx(5.0, abs=1e-6)
    assert 5.0 < _bits_per_weight(captured, offset, "offset") <= 5.5
    assert offset.plan["bits_per_weight"] == pytest.approx(_bits_per_weight(captured, offset, "offset"), abs=1e-4)
    assert 0 < len(offset.overrides) < len(symmetric.overrides)
    assert offset.plan["estimated_loss_all_int4"] < symmetric.plan["estimated_loss_all_int4"]
    # a budget under the grid's own bits keeps every layer int4 and says what it spends
    under = _plan(captured, 4.5, "offset")
    assert not under.overrides and under.plan["bits_per_weight"] == pytest.approx(5.0, abs=1e-4)
    with torch.no_grad():  # the weights put on the offset grid, as a Q4_1 source's are
        for name in INT4.layers(captured.module):
            weight = captured.module.get_submodule(name).weight
            weight.copy_(fake_quantize(weight, INT4.linear, OffsetGrid(torch.float16)))
    on_grid = plan_decoder_precision(captured, INT4, *read_calibration(None), 8.5, ("offset", "symmetric"))
    assert not on_grid["offset"].overrides and on_grid["symmetric"].overrides
    assert on_grid["offset"].plan["estimated_loss_all_int4"] < 1e-3 * on_grid["symmetric"].plan["estimated_loss_all_int4"]


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])  # a tied table, a tied one scaled, an untied one
def test_squared_gradients_match_autograd_with_the_table_lookup_taken_sparse(family):
    """_fisher takes the embedding lookup's share of the table's gradient as the looked-up rows (a
    dense table-sized gradient cost a 1B model 2 GiB); the sums are what plain autograd gives."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(decoder_config(family)).eval()
    weights = [p for p in model.parameters() if p.dim() == 2]  # the table (and an untied head) included
    model.requires_grad_(False)  # as loaded
    table = model.get_input_embeddings().weight
    assert any(w is table for w in weights) and (model.get_output_embeddings().weight is table) == (family != "phi3")
    chunks = [torch.randint(0, 512, (1, 24)) for _ in range(3)]
    chunks[0][0, :4] = 7  # a row looked up more than once in a chunk
    expected = [torch.zeros_like(w) for w in weights]
    for w in weights:
        w.requires_grad_(True)
    for chunk in chunks:
        logits = model(input_ids=chunk, use_cache=False).logits[0, :-1]
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"), weights)
        for e, g in zip(expected, grads):
            e += g ** 2
    model.requires_grad_(False)
    fisher = _fisher(model, chunks, weights)
    for w, f, e in zip(weights, fisher, expected):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-10 * float(e.max()))
    assert float(fisher[[w is table for w in weights].index(True)].sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not model.get_input_embeddings()._forward_hooks and not model.get_input_embeddings().sparse
