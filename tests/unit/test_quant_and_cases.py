"""Fast checks of the pieces every stage shares: the quant spec and the comparisons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgepack.cases import CaseOutput, Tolerance, compare, compare_free_running, cosine, decode_greedy, within
from edgepack.errors import InputError
from edgepack.quant import QuantSpec
from tests.conftest import ExecutorchMethod


def test_quant_spec_translations():
    spec = QuantSpec.from_options("int4", 32)
    assert spec.linear.bits == 4 and spec.linear.group_size == 32 and spec.dynamic_int8_activations
    assert QuantSpec.from_options("int8").linear.group_size is None
    assert QuantSpec.from_options("none").linear is None
    with pytest.raises(InputError):
        QuantSpec.from_options("int4", 48)


def test_ideal_bytes_counts_tied_weights_once():
    emb = nn.Embedding(100, 64)
    head = nn.Linear(64, 100, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "norm": nn.LayerNorm(64)})
    spec = QuantSpec.from_options("int4", 32)
    # 4 bits a weight + one fp16 scale per 32, the norm's 128 parameters at fp32
    assert spec.ideal_bytes(model) == int(100 * 64 * 4.5 / 8 + 2 * 64 * 4)
    # an fp16 program (CoreML) stores scales and the rest at 16 bits
    assert spec.ideal_bytes(model, float_bits=16, scale_bits=16) == int(100 * 64 * 4.5 / 8 + 2 * 64 * 2)
    # per-channel int8: one scale per row
    assert QuantSpec.from_options("int8").ideal_bytes(model) == 100 * 64 + 100 * 2 + 2 * 64 * 4


def test_group_size_check_names_the_layer():
    model = nn.Sequential(nn.Linear(48, 8))
    with pytest.raises(InputError, match=r"0 \(width 48\)"):
        QuantSpec.from_options("int4", 32).check_model(model)


def test_compare_detects_token_and_value_drift():
    logits = np.eye(4, 8, dtype=np.float32) * 5
    ref = CaseOutput(("tokens", "logits"), (np.arange(4), logits))
    same = compare(ref, ref)
    assert same["tokens_match"] and same["min_cosine"] == 1.0 and same["max_abs_diff"] == 0.0
    assert same["steps"] == same["steps_verified"] == 4 and within(same, Tolerance(0.99)) == []
    drifted = logits.copy()
    drifted[2] = np.eye(8)[3] * 5  # step 2 prefers token 3 by 5: no near-tie
    metrics = compare(ref, CaseOutput(("tokens", "logits"), (drifted.argmax(1), drifted)))
    assert metrics["top1_agreement"] == 0.75 and [m["step"] for m in metrics["top1_mismatches"]] == [2]
    assert any("top-1 differs at step 2" in r for r in within(metrics, Tolerance(0.5)))


def test_teacher_forced_compare_judges_every_step_and_excuses_only_true_near_ties():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 8)).astype(np.float32)
    logits[1, :2] = [3.0, 2.95]  # a near-tie at step 1: top-2 margin 0.05
    ref = CaseOutput(("tokens", "logits"), (logits.argmax(1), logits))
    flipped = logits.copy()
    flipped[1, 1] = 3.1  # the artifact breaks the tie the other way, nothing else moves
    metrics = compare(ref, CaseOutput(("tokens", "logits"), (flipped.argmax(1), flipped)))
    [m] = metrics["top1_mismatches"]
    assert m["step"] == 1 and m["reference_margin"] == pytest.approx(0.05, abs=1e-5)
    # no noise anywhere else: the flip is not explained by numerics, so it fails
    assert m["noise"] == 0.0 and not m["near_tie"] and metrics["steps_verified"] == 6
    assert "preferred its token by 0.05" in within(metrics, Tolerance(0.99))[0]
    # the same flip from an artifact whose logits are 0.1 off elsewhere: a near-tie, and the
    # steps after it are still judged: a later step that breaks is caught
    noisy = flipped.copy()
    noisy[0] += 0.1
    tie = compare(ref, CaseOutput(("tokens", "logits"), (noisy.argmax(1), noisy)))
    assert tie["near_tie_steps"] == [1] and tie["steps_verified"] == 6 and within(tie, Tolerance(0.99)) == []
    broken = noisy.copy()
    broken[4] = rng.normal(size=8) * 5
    late = compare(ref, CaseOutput(("tokens", "logits"), (broken.argmax(1), broken)))
    assert within(late, Tolerance(0.99)), late  # cosine at step 4 (and its top-1, unless a tie) fail
    # a wrong step cannot lend itself noise: its row rolled by one moves all its logits, but the
    # noise is measured on the steps whose top-1 agrees (none moved), so the flip fails as a flip
    rolled = noisy.copy()
    rolled[3] = np.roll(logits[3], 1)
    wrong = compare(ref, CaseOutput(("tokens", "logits"), (rolled.argmax(1), rolled)))
    [step3] = [m for m in wrong["top1_mismatches"] if m["step"] == 3]
    assert step3["noise"] == pytest.approx(0.1, abs=1e-6) and not step3["near_tie"], step3
    assert any("top-1 differs at step 3" in f for f in within(wrong, Tolerance(0.99)))


def test_non_finite_outputs_fail_even_where_the_cosine_would_not_say():
    logits = np.eye(3, 5, dtype=np.float32) * 4
    ref = CaseOutput(("tokens", "logits"), (np.arange(3), logits))
    nan = logits.copy()
    nan[1, 4] = np.nan
    metrics = compare(ref, CaseOutput(("tokens", "logits"), (np.arange(3), nan)))
    assert metrics["non_finite"] == 1 and "non-finite" in within(metrics, Tolerance(0.5))[0]


def test_free_running_compare_says_where_greedy_paths_part():
    exp = CaseOutput(("tokens", "logits"), (np.array([1, 2, 3, 4]), np.zeros((4, 5))))
    act = CaseOutput(("tokens", "logits"), (np.array([1, 2, 0, 4]), np.zeros((4, 5))))
    assert compare_free_running(exp, act) == {"tokens_match": False, "first_token_mismatch": 2}
    assert compare_free_running(exp, exp) == {"tokens_match": True, "first_token_mismatch": None}


def test_compare_reports_shape_mismatch():
    a = CaseOutput(("output_0",), (np.zeros((2, 3)),))
    b = CaseOutput(("output_0",), (np.zeros((3, 2)),))
    assert "shape mismatch" in within(compare(a, b), Tolerance(0.9))[0]


def test_cosine():
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0
    assert cosine(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(1.0)


def test_decode_greedy_feeds_back_argmax_and_positions():
    calls = []

    def call(method, inputs):
        tokens, pos = inputs
        calls.append((tokens.tolist(), int(pos[0])))
        logits = np.zeros((1, 10), dtype=np.float32)
        logits[0, (int(pos[0]) + tokens.shape[1]) % 10] = 1.0
        return [logits]

    out = decode_greedy(call, "forward", np.array([[7, 8, 9]]), steps=3)
    assert out.get("tokens").tolist() == [3, 4, 5]
    assert calls == [([[7, 8, 9]], 0), ([[3]], 3), ([[4]], 4)]


def test_weight_only_reference_quantizes_each_group_on_the_backend_grid():
    import torch

    from edgepack.exporters.weights import Rounding, weight_only_reference

    torch.manual_seed(0)
    emb = nn.Embedding(10, 64)
    head = nn.Linear(64, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    ref = weight_only_reference(model, QuantSpec.from_options("int4", 32), lambda b: Rounding.symmetric(b, narrow=True))
    w = ref["head"].weight.detach().reshape(10, 2, 32)
    scale = emb.weight.detach().reshape(10, 2, 32).abs().amax(-1, keepdim=True) / 7
    levels = torch.round(w / scale)
    assert torch.allclose(levels * scale, w) and levels.abs().max() <= 7
    assert ref["head"].weight is ref["emb"].weight  # still tied
    assert not torch.equal(ref["emb"].weight, emb.weight)  # the original is untouched


def test_coreml_offset_grid_keeps_a_block_far_from_zero_finite_in_fp16():
    """A block of values near 1000 spread over 1e-3: its offset -min/scale would be ~10^7, past
    fp16's range (inf weights). The grid widens that block's step until the offset is at most 512
    steps, so every value comes back within half a step (and fp16's own rounding), finite."""
    import torch

    from edgepack.exporters.weights import OffsetGrid
    from edgepack.quant import WeightQuant

    weight = torch.linspace(-1, 1, 64).reshape(2, 32)
    weight[1] = 1000 + torch.linspace(0, 1e-3, 32)
    grid = OffsetGrid(torch.float16)
    q, scale, offset = grid.blocks(weight, 32)
    assert torch.isfinite(offset.float()).all() and offset.float().abs().max() <= 513
    image = grid.image(weight, WeightQuant(bits=4, group_size=32))
    half = weight.half().float()
    assert ((image - half).abs() <= 0.5 * scale.float().repeat_interleave(32, dim=1) + 2 ** -11 * half.abs()).all()
    assert (image[0] - weight[0]).abs().max() <= 1 / 15 + 1e-3  # an ordinary block keeps its 15 steps


def test_executorch_offset_grid_stores_each_blocks_min_max_grid():
    """quantize_module on the offset grid (torchao tensors built from the grid's own codes, not
    torchao's rounding): a tied table and LM head, a biased linear. The embedding holds the offset
    grid's fp16 image (weights.OffsetGrid: fp16 scales and zero points, rows looked up in fp16 as
    embedding_4bit returns them, then widened to float32); a linear's
    symmetric part (its scales in bf16, as XNNPACK stores them) is exact, its int8 offsets (taken
    by block means: 32× the blocks' offsets) within half a step, and eager output matches the
    grid's float model up to the int8 activations."""
    import copy

    import torch

    from edgepack.exporters.executorch.lower import quantize_module
    from edgepack.exporters.executorch.offset_grid import OffsetLinear
    from edgepack.exporters.weights import OffsetGrid, WeightQuant, quantize_min_max

    torch.manual_seed(0)

    def on_grid(w):  # a linear's scales as XNNPACK stores them
        q, scale, minimum = quantize_min_max(w.detach(), 4, 32, scale_dtype=torch.bfloat16)
        return (minimum + scale * q).reshape(w.shape)

    emb, head, mid = nn.Embedding(50, 64), nn.Linear(64, 50, bias=False), nn.Linear(64, 64)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "mid": mid, "head": head})
    quantized = quantize_module(copy.deepcopy(model), QuantSpec.from_options("int4", 32), "offset")
    table, grid = quantized["emb"].weight.dequantize(), OffsetGrid(torch.float16).image(emb.weight.detach(), WeightQuant(4, 32))
    assert table.dtype == torch.float16 and quantized["emb"](torch.tensor([0])).dtype == torch.float32
    assert torch.allclose(table.float(), grid, rtol=2**-10, atol=1e-6), (table.float() - grid).abs().max()
    for name in ("mid", "head"):
        layer, w = quantized[name], model[name].weight.detach()
        assert isinstance(layer, OffsetLinear)
        q, scale, minimum = quantize_min_max(w, 4, 32, scale_dtype=torch.bfloat16)
        assert torch.equal(layer.symmetric.weight.dequantize().reshape(q.shape), (q - 8) * scale)
        offsets, want = layer.offsets.weight.dequantize(), 32 * (minimum + 8 * scale).squeeze(-1)
        step = want.abs().amax(-1, keepdim=True) / 127
        assert ((offsets - want).abs() <= 0.51 * step + 1e-7).all()
    assert torch.equal(quantized["mid"].offsets.bias, mid.bias)
    tokens = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        got = quantized["head"](quantized["mid"](quantized["emb"](tokens)))
        hidden = nn.functional.linear(grid[tokens], on_grid(mid.weight), mid.bias)
        want = nn.functional.linear(hidden, on_grid(head.weight))
    assert torch.allclose(got, want, rtol=0, atol=0.02 * want.abs().max()), (got - want).abs().max()


def test_executorch_offset_grid_runs_a_constant_block_in_xnnpack():
    """A block whose weights are all equal (an all-zero block here, as in padded rows) has a
    min..max step of 0; XNNPACK refuses a block scale of 0 at load. The offset grid stores it as
    code 0 at scale 1 with its value in the offset: the .pte loads and its eager reference holds
    the block exactly."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgepack.exporters.executorch.lower import quantize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16, bias=False))
    with torch.no_grad():
        model[0].weight[3, :32] = 0.0
    quantized = quantize_module(model, QuantSpec.from_options("int4", 32), "offset")
    layer = quantized[0]
    assert torch.equal(layer.symmetric.weight.dequantize()[3, :32], torch.zeros(32))
    assert layer.offsets.weight.dequantize()[3, 0] == 0.0
    x = torch.randn(1, 64)
    with torch.no_grad():
        want = quantized(x)
    program = to_edge_transform_and_lower(torch.export.export(quantized, (x,)), partitioner=[XnnpackPartitioner()])
    [got] = ExecutorchMethod(program.to_executorch().buffer)([x])
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()


def test_executorch_offset_grid_layer_is_one_delegate_call_over_a_dynamic_length():
    """A linear on the offset grid takes its input's block means by a 4-D mean, which XNNPACK runs
    as global average pooling (it refuses a 3-D mean): the symmetric GEMM, the means, the offsets'
    GEMM and the add lower to one delegate call with nothing outside it, over a dynamic number of
    tokens, and the runtime's output is the eager module's within the int8 activations' noise."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgepack.exporters.executorch.lower import quantize_module

    torch.manual_seed(0)
    quantized = quantize_module(nn.Sequential(nn.Linear(96, 48)), QuantSpec.from_options("int4", 32), "offset")
    tokens = torch.export.Dim("tokens", min=1, max=64)
    example = torch.randn(1, 5, 96)
    program = to_edge_transform_and_lower(torch.export.export(quantized, (example,), dynamic_shapes=({1: tokens},)),
                                          partitioner=[XnnpackPartitioner()])
    called = [str(n.target) for n in program.exported_program().graph.nodes if n.op == "call_function"]
    assert called == ["executorch_call_delegate", "<built-in function getitem>"], called
    method = ExecutorchMethod(program.to_executorch().buffer)
    for length in (1, 7):
        x = torch.randn(1, length, 96)
        [got] = method([x])
        with torch.no_grad():
            want = quantized(x)
        assert got.shape == want.shape and want.abs().max() > 0.1
        assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("grid", ["offset", "symmetric"])
def test_executorch_reference_holds_the_block_scales_xnnpack_stores(grid):
    """XNNPACK keeps a 4-bit block's scale in bf16 whatever torch hands it (its serializer
    casts them), so the eager reference's must already be bf16 values, or the reference is not
    the model the .pte runs (on the real SmolLM2-135M fp16 scales put the .pte at logits
    cosine 0.963 from its reference, failing its smoke). On both grids the scales are chosen
    among bf16 values and the codes rounded with them."""
    import copy

    import torch
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    from edgepack.exporters.executorch.lower import quantize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64))
    quantized = quantize_module(copy.deepcopy(model), QuantSpec.from_options("int4", 32), grid)
    blocks = [m.weight for m in quantized.modules() if isinstance(m, nn.Linear)
              and isinstance(m.weight, IntxUnpackedToInt8Tensor) and m.weight.block_size[-1] < m.weight.shape[-1]]
    assert len(blocks) == 2  # offset: each layer's symmetric part with its indicator rows, one linear
    for w in blocks:
        assert w.scale.dtype == torch.float32 and torch.equal(w.scale, w.scale.to(torch.bfloat16).float())


def test_searched_symmetric_scales_leave_no_block_further_than_hqq_and_most_closer():
    """The symmetric grid's 4-bit scales (ExecuTorch's `--executorch-grid symmetric`, export_llm's
    grid): per block, never more squared error than torchao's HQQ (export_llm's choice) leaves
    with the same bf16 scales, and on Gaussian weights at least 5 % less over the whole matrix
    (measured 6.4 %). And the .pte's tensors hold exactly these codes and scales."""
    import torch
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    from edgepack.exporters.executorch.lower import quantize_module
    from edgepack.exporters.weights import search_symmetric_scales

    w = torch.randn(384, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[7, :32] = 0.0  # an all-zero block: scale 1 (XNNPACK refuses 0), codes 0
    codes, scale = search_symmetric_scales(w, 32, torch.bfloat16)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert torch.equal(scale, scale.to(torch.bfloat16).float()) and float(scale[7, 0]) == 1.0
    assert not codes[7, :32].any()

    def block_errors(q, s):
        return ((w.reshape(384, 8, 32) - q.reshape(384, 8, 32).float() * s.unsqueeze(-1)) ** 2).sum(-1)

    _, hqq = _choose_qparams_and_quantize_scale_only_hqq(w, [1, 32], -8, 7)
    hqq = hqq.reshape(384, 8).to(torch.bfloat16).float()
    hqq_codes = torch.clamp(torch.round(w.reshape(384, 8, 32) / hqq.unsqueeze(-1)), -8, 7)
    searched, plain = block_errors(codes, scale), block_errors(hqq_codes, hqq)
    assert (searched <= plain).all()
    assert searched.sum() < 0.95 * plain.sum(), float(searched.sum() / plain.sum())

    linear = nn.Linear(256, 384, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    stored = quantize_module(nn.Sequential(linear), QuantSpec.from_options("int4", 32), "symmetric")[0].weight
    assert torch.equal(stored.qdata, codes) and torch.equal(stored.scale, scale)


def test_norm_affine_is_measured_and_folds_exactly():
    import torch

    from edgepack.exporters.weights import NormAffine

    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
        ln.bias.uniform_(-1.0, 1.0)

    class GemmaStyleRMSNorm(nn.Module):  # scales by 1 + weight
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(-0.5, 0.5, 8))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    rms = GemmaStyleRMSNorm()
    assert torch.allclose(NormAffine.measure(ln, 8).scale, ln.weight, atol=1e-4)
    assert torch.allclose(NormAffine.measure(ln, 8).shift, ln.bias, atol=1e-5)
    assert torch.allclose(NormAffine.measure(rms, 8).scale, 1 + rms.weight, atol=1e-4)
    for norm in (ln, rms):
        linear = nn.Linear(8, 4)
        x = torch.randn(3, 8)
        with torch.no_grad():
            expected = linear(norm(x))
            NormAffine.measure(norm, 8).fold_into(linear, lambda w: w)  # identity "quantizer"
            assert torch.allclose(linear(norm(x)), expected, atol=1e-5)


def test_a_folded_multiplier_is_applied_after_the_norm_scale():
    """litert folds attention's 1/sqrt(head_dim) after γ, (W·γ)·m, which rounds differently from
    W·(γ·m) in some elements (and so can move a bfloat16 scale): the fold hands the quantizer the
    converter's product and the layer still computes W·norm(x)."""
    import torch

    from edgepack.exporters.weights import NormAffine

    torch.manual_seed(0)
    ln, linear = nn.LayerNorm(64), nn.Linear(64, 64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
    affine, m = NormAffine.measure(ln, 64), 32 ** -0.25
    weight = linear.weight.detach().clone()
    assert not torch.equal((weight * affine.scale) * m, weight * (affine.scale * m))  # the order matters here
    handed, x = [], torch.randn(3, 64)
    with torch.no_grad():
        expected = linear(ln(x))
        NormAffine(affine.scale, affine.shift, m).fold_into(linear, lambda w: handed.append(w) or w)
        assert torch.equal(handed[0], (weight * affine.scale) * m)
        assert torch.allclose(linear(ln(x)), expected, atol=1e-5)


@pytest.mark.parametrize("grid", ["offset", "symmetric"])
def test_executorch_linears_reading_one_input_become_one_and_compute_the_same(grid):
    """q, k and v read one input, as gate and up do; stored alike they become one wide linear
    whose output each slices (per-row weights and per-token activations: the same numbers), a
    layer stored otherwise (int8 by the plan) stays apart, and the eager output is unchanged."""
    import copy

    import torch

    from edgepack.exporters.executorch.lower import quantize_module
    from edgepack.exporters.executorch.shared_input import SliceOf, linears_reading_one_input
    from edgepack.exporters.mixed_precision import INT8

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(64, n, bias=False) for n in (64, 32, 32))
            self.o = nn.Linear(96, 64, bias=False)
            self.gate, self.up, self.down = nn.Linear(64, 96), nn.Linear(64, 96), nn.Linear(96, 64)

        def forward(self, x):
            x = x + self.o(torch.cat([self.q(x), self.k(x) * self.v(x).sigmoid()], dim=-1))
            return x + self.down(self.gate(x).relu() * self.up(x))

    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(1, 5, 64)
    assert linears_reading_one_input(model, (x,)) == [["q", "k", "v"], ["gate", "up"]]
    spec = QuantSpec.from_options("int4", 32)
    for plan in ({}, {"v": INT8}):
        planned = spec.with_overrides(plan, {}) if plan else spec
        apart = quantize_module(copy.deepcopy(model), planned, grid)
        shared = quantize_module(copy.deepcopy(model), planned, grid, (x,))
        sliced = {name for name, m in shared.named_children() if isinstance(m, SliceOf)}
        assert sliced == ({"q", "k", "gate", "up"} if plan else {"q", "k", "v", "gate", "up"})
        with torch.no_grad():
            want, got = apart(x), shared(x)
            assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max()), (got - want).abs().max()
            assert torch.equal(shared(x), got)  # computed afresh for each input, never stale


def test_offset_grids_are_the_same_computed_on_slices_of_rows(monkeypatch):
    """A vocabulary table's grid is computed a slice of rows at a time (weights.by_row_slices, to
    bound the float temporaries): the codes, scales and offsets are those of the whole table,
    blocks that need a wider step or are constant (zero or not) included."""
    import torch

    from edgepack.exporters import weights
    from edgepack.exporters.weights import OffsetGrid, search_symmetric_scales, split_min_max

    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    w[3, :32] = 0.0  # constant blocks: zero, and far from zero (fp16 widens the step of its neighbour)
    w[5, 32:] = 7.0
    w[5, :32] = 3000.0 + torch.linspace(0, 0.01, 32)
    w[9, :32] = 1e-9 * torch.arange(32)  # a step under the smallest scale
    cases = {"split": lambda: split_min_max(w, 32, torch.bfloat16, 1e-6),
             "fp16": lambda: OffsetGrid(torch.float16).blocks(w, 32),
             "searched": lambda: search_symmetric_scales(w, 32, torch.bfloat16)}
    whole = {name: make() for name, make in cases.items()}
    monkeypatch.setattr(weights, "SLICE_ELEMENTS", 5 * 64)  # 5 rows a slice: 37 rows in 8 slices
    for name, make in cases.items():
        for got, want in zip(make(), whole[name], strict=True):
            assert got.shape == want.shape and torch.equal(got, want), name


def test_fitted_blocks_lower_the_weighted_error_and_survive_a_min_max_quantizer():
    """weights.fit_min_max_ on weights off any 4-bit grid (rows enough for two of its slices): less
    importance-weighted error than min..max, and each block spans codes 0..15, so quantize_min_max
    holds the fitted weight as it holds a Q4_1 source (the backends quantize it again)."""
    from edgepack.exporters.weights import fit_min_max_, quantize_min_max

    torch.manual_seed(0)
    weight = torch.randn(40000, 64)
    importance = torch.rand(64) ** 4 * 100  # a few columns carry most of the input
    fitted = weight.clone()
    ratio = fit_min_max_(fitted, 32, importance)
    q, scale, minimum = quantize_min_max(weight, 4, 32, scale_dtype=torch.float16)
    plain = (q * scale + minimum.half().float()).reshape(weight.shape)

    def weighted(image):
        return float((importance * (image - weight) ** 2).sum())

    assert weighted(fitted) < 0.8 * weighted(plain) and ratio == pytest.approx(weighted(fitted) / weighted(plain), rel=1e-3)
    q, scale, minimum = quantize_min_max(fitted, 4, 32, scale_dtype=torch.float16)
    assert torch.allclose((q * scale + minimum).reshape(fitted.shape), fitted, atol=1e-6, rtol=0)


def test_fitted_blocks_leave_a_q4_1_source_as_it_is():
    """A weight already on the offset grid (fp16 scale and minimum, codes 0..15 in every block)
    comes back unchanged whatever the importance, a column weighing nothing included."""
    from edgepack.exporters.weights import fit_min_max_

    torch.manual_seed(1)
    codes = torch.randint(0, 16, (32, 4, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    scale = (torch.rand(32, 4, 1) * 0.1).half().float()
    minimum = (torch.randn(32, 4, 1) * 0.1).half().float()
    source = (codes * scale + minimum).reshape(32, 128)
    importance = torch.rand(128)
    importance[:7] = 0
    fitted = source.clone()
    assert fit_min_max_(fitted, 32, importance) == 1.0 and torch.equal(fitted, source)
