"""The smoke's bound for an artifact against its quantized reference: the captured 0.99, loosened
to twice the deviation the reference shows against itself with its linear inputs nudged by 1e-6,
and never below capture.TOLERANCE_FLOOR, whatever the nudge shows. Measured on the tiny Llama with
hooks that make the reference's linear inputs more or less sensitive to the nudge (as int8 dynamic
activations are: a rounding flips)."""

from __future__ import annotations

import pytest
import torch

from edgepack.exporters.capture import (
    TOLERANCE_FLOOR,
    CaptureOptions,
    capture,
    linear_inputs_hooked,
    quantized_reference,
)
from edgepack.exporters.sources import load_source


@pytest.fixture(scope="module")
def tiny_llama_capture(llama_dir):
    return capture(load_source(str(llama_dir)), CaptureOptions())


def sensitive_linear_inputs(module: torch.nn.Module, amount: float):
    """Each linear's input x becomes x + amount * |x| * sin(x * 1e9): fixed for a given x, while the
    nudge's relative 1e-6 moves the sine by about a thousand radians, i.e. anywhere."""
    return linear_inputs_hooked(module, lambda x: x + amount * x.abs() * torch.sin(x * 1e9))


def test_a_calm_reference_keeps_the_captured_bound(tiny_llama_capture):
    tolerance = quantized_reference(tiny_llama_capture.module, tiny_llama_capture).tolerance
    assert tolerance.nudged_cosine > 0.9999
    assert tolerance.min_cosine == tiny_llama_capture.tolerance.min_cosine == 0.99


def test_a_noisy_reference_loosens_the_bound_to_twice_its_noise(tiny_llama_capture):
    with sensitive_linear_inputs(tiny_llama_capture.module, 0.05):
        tolerance = quantized_reference(tiny_llama_capture.module, tiny_llama_capture).tolerance
    noise = tolerance.nudged_cosine
    assert TOLERANCE_FLOOR < 1 - 2 * (1 - noise) < 0.99, noise
    assert tolerance.min_cosine == pytest.approx(1 - 2 * (1 - noise), abs=1e-4)


def test_no_reference_loosens_the_bound_below_the_floor(tiny_llama_capture):
    with sensitive_linear_inputs(tiny_llama_capture.module, 1.0):
        tolerance = quantized_reference(tiny_llama_capture.module, tiny_llama_capture).tolerance
    assert tolerance.nudged_cosine < 0.5
    assert tolerance.min_cosine == TOLERANCE_FLOOR == 0.90
