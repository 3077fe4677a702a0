"""bench.gptq_symmetric compares GPTQ with rounding to nearest on one grid: its GPTQ must stay on that
grid and fit the calibration inputs better, or the comparison measures something else."""

import torch

from bench.gptq_symmetric import QMAX, QMIN, gptq, hqq_scales, round_to_nearest


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
