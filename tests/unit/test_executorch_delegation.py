"""delegate_to_xnnpack asks XNNPACK's partitioner to keep its ops out of ExecuTorch's
decompositions without checking each node first: ExecuTorch then decomposes the program twice
instead of three times, and the .pte is the one the checked path writes, byte for byte. Where a
kept node is one XNNPACK does not take, the checked path runs instead, to the same bytes."""

import pytest
import torch
from torch import nn

from edgepack.exporters.executorch.lower import delegate_to_xnnpack, quantize_module
from edgepack.quant import QuantSpec
from tests.conftest import ExecutorchMethod


def _checked(program):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])


def _counting_decompositions(monkeypatch) -> list:
    calls = []
    original = torch.export.ExportedProgram.run_decompositions

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", counted)
    return calls


@pytest.mark.parametrize("grid", ["offset", "symmetric"])
def test_quantized_linears_lower_with_one_decomposition_less_to_the_same_pte(grid, monkeypatch):
    torch.manual_seed(0)
    model = quantize_module(nn.Sequential(nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 32)),
                            QuantSpec.from_options("int4", 32), grid)
    x = torch.randn(3, 64)
    calls = _counting_decompositions(monkeypatch)
    checked = _checked(torch.export.export(model, (x,))).to_executorch().buffer
    checked_calls, calls[:] = len(calls), []
    ours = delegate_to_xnnpack(torch.export.export(model, (x,)), None).to_executorch().buffer
    assert len(calls) < checked_calls  # 2 against 3 (symmetric) and 9 (offset: the check itself decomposes)
    assert ours == checked
    [got] = ExecutorchMethod(ours)([x])
    with torch.no_grad():
        want = model(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()


def test_a_node_xnnpack_does_not_take_lowers_on_the_checked_path():
    """A linear layer whose weight is an input: XNNPACK's check declines it, so the checked path
    decomposes it (a matmul outside the delegate, which only that path makes); kept whole,
    ExecuTorch stops on it."""

    class WeightAsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fixed = nn.Linear(4, 3)

        def forward(self, x, w):
            return self.fixed(x) + nn.functional.linear(x, w)

    torch.manual_seed(0)
    model, inputs = WeightAsInput(), (torch.randn(2, 4), torch.randn(3, 4))
    ours = delegate_to_xnnpack(torch.export.export(model, inputs), None)
    outside = [str(getattr(n.target, "_op", n.target)) for n in ours.exported_program().graph.nodes if n.op == "call_function"]
    assert "aten.mm.default" in outside and outside.count("executorch_call_delegate") == 2
    assert ours.to_executorch().buffer == _checked(torch.export.export(model, inputs)).to_executorch().buffer
