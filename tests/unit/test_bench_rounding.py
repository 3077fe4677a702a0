"""bench.rounding_symmetric compares GPTQ and AWQ's scaling with rounding to nearest on one grid:
each must stay on that grid and fit the calibration inputs better, or the comparison measures
something else."""

import torch

from bench.rounding_symmetric import QMAX, QMIN, awq_rounded, awq_scales, gptq, hqq_scales, round_to_nearest


def test_gptq_stays_on_the_grid_and_fits_the_inputs_better_than_rounding_to_nearest():
    torch.manual_seed(0)
    weight = torch.randn(48, 256)
    # correlated inputs (fewer tokens than columns, as a small calibration set gives): where GPTQ
    # has something to trade between columns
    x = torch.randn(200, 16) @ torch.randn(16, 256) + 0.1 * torch.randn(200, 256)
    hessian = 2 * x.T @ x
    scale = hqq_scales(weight)
    nearest, fitted = round_to_nearest(weight, scale), gptq(weight, hessian, scale, damping=0.01, step=64)

    codes = fitted / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= QMIN and codes.round().max() <= QMAX

    def error(q: torch.Tensor) -> float:
        delta = q - weight
        return torch.einsum("ij,jk,ik->", delta, hessian, delta).item()

    assert error(fitted) < 0.5 * error(nearest)
    # what it gives up: the weights themselves, further from the float ones
    assert (fitted - weight).pow(2).mean() > (nearest - weight).pow(2).mean()


def test_awq_scales_never_fit_the_inputs_worse_than_rounding_to_nearest_and_stay_on_the_scaled_grid():
    torch.manual_seed(0)
    weights = [torch.randn(48, 256), torch.randn(32, 256)]
    # a few input channels far larger than the rest, as a norm's output has: what AWQ protects
    x = torch.randn(300, 256) * torch.where(torch.arange(256) % 37 == 0, 20.0, 1.0)
    s, alpha = awq_scales(weights, x)
    assert 0 < alpha < 1

    def error(rounded) -> float:
        return sum((x @ (q - w).T).pow(2).sum().item() for w, q in zip(weights, rounded))

    nearest = [round_to_nearest(w, hqq_scales(w)) for w in weights]
    scaled = [awq_rounded(w, s) for w in weights]
    assert error(scaled) < 0.8 * error(nearest)
    for w, q in zip(weights, scaled):
        stored = q * s  # what a backend stores once s is folded into the input's producer
        codes = stored / hqq_scales(w * s)
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert codes.round().min() >= QMIN and codes.round().max() <= QMAX
