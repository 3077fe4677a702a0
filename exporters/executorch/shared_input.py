"""Linear layers that read the same input (attention's q, k and v; an MLP's gate and up) stored
as one wider linear whose output each of them slices.

The rows of a linear layer are quantized independently (per-row int8, per-block int4) and its
input's dynamic int8 quantization is per token, so the wide layer computes exactly what the
layers did. XNNPACK then runs one GEMM and quantizes the input once instead of once per layer,
and the lowering, whose time grows with the graph's nodes, carries fewer of them (a linear on
the offset grid is two linears, a mean and an add)."""

from __future__ import annotations

import torch
from torch import nn

from edgepack.exporters.weights import run_copy_with_hooks
from edgepack.quant import WeightQuant


class SharedInput(nn.Module):
    """One linear for the layers that read one input: their weights stacked by rows. Each member
    takes its slice of the output; it is computed once per input and forgotten when every member
    has taken its slice."""

    def __init__(self, wide: nn.Linear, widths: list[int]):
        super().__init__()
        self.wide, self.widths = wide, widths
        self._input, self._slices, self._taken = None, (), set()

    def slice_for(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._input is not x or index in self._taken:
            # one split kernel outside XNNPACK (its slices take no dynamic length), not a slice each
            self._slices = self.wide(x).split(self.widths, dim=-1)
            self._input, self._taken = x, set()
        self._taken.add(index)
        result = self._slices[index]
        if len(self._taken) == len(self.widths):
            self._input, self._slices = None, ()
        return result


class SliceOf(nn.Module):
    """A member layer: its rows of the shared linear's output."""

    def __init__(self, shared: SharedInput, index: int):
        super().__init__()
        self.shared, self.index = shared, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.slice_for(self.index, x)


def linears_reading_one_input(module: nn.Module, example_inputs: tuple) -> list[list[str]]:
    """Groups of two or more linear layers called on the very same input tensor, found by running
    a copy of `module` once (the forward pass may write caches)."""
    seen: dict[int, tuple[torch.Tensor, list[str]]] = {}  # inputs kept alive: ids stay unique
    run_copy_with_hooks(module, example_inputs, lambda probe: [layer.register_forward_pre_hook(
        lambda _, args, name=name: seen.setdefault(id(args[0]), (args[0], []))[1].append(name))
        for name, layer in probe.named_modules() if isinstance(layer, nn.Linear)])
    return [names for _, names in seen.values() if len(set(names)) == len(names) > 1]


def share_inputs(module: nn.Module, example_inputs: tuple, layers: dict[str, WeightQuant]) -> dict[str, WeightQuant]:
    """Replace the linears that read one input and are stored alike (the same quantization, all
    with or all without bias) by one SharedInput each; returns `layers` with each wide layer in
    place of its members."""
    if not layers:  # nothing quantized (--quant none): no layer to share, no probe run
        return layers
    modules = dict(module.named_modules())
    users: dict[int, int] = {}
    for m in modules.values():
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            users[id(m.weight)] = users.get(id(m.weight), 0) + 1
    for group in linears_reading_one_input(module, example_inputs):
        alike: dict[tuple, list[str]] = {}
        for name in group:
            if name in layers and users[id(modules[name].weight)] == 1:  # a tied weight stays where it is
                alike.setdefault((layers[name], modules[name].bias is None), []).append(name)
        for (wq, _), names in alike.items():
            if len(names) > 1:
                layers = {n: q for n, q in layers.items() if n not in names}
                layers[_share(module, names, [modules[n] for n in names])] = wq
    return layers


def _share(module: nn.Module, names: list[str], members: list[nn.Linear]) -> str:
    """Put one SharedInput in place of `members`; returns the wide layer's name in `module`."""
    wide = nn.Linear(members[0].in_features, sum(m.out_features for m in members), bias=members[0].bias is not None,
                     device="meta")  # no initial weights to fill and overwrite
    with torch.no_grad():
        wide.weight = nn.Parameter(torch.cat([m.weight for m in members]), requires_grad=False)
        if wide.bias is not None:
            wide.bias = nn.Parameter(torch.cat([m.bias for m in members]), requires_grad=False)
    shared = SharedInput(wide, [m.out_features for m in members])
    for index, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, SliceOf(shared, index))
    return next(n for n, m in module.named_modules() if m is wide)
