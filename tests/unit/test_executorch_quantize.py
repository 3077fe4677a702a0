"""ExecuTorch's quantized copy of a captured decoder shares the capture's float weights and
never writes into them: a second float copy would be another 5 GB on a 1B model (bench.scale),
and a write would corrupt what the other backends and the quality stage read after it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_llama_capture(llama_dir):
    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.sources import load_source

    return capture(load_source(str(llama_dir)), CaptureOptions(max_seq_len=64))


@pytest.mark.parametrize("grid", ["offset", "symmetric"])
def test_quantized_copy_shares_and_keeps_the_float_weights(tiny_llama_capture, grid):
    from edgepack.exporters.executorch.lower import STEPS, _Work
    from edgepack.exporters.executorch.options import Options
    from edgepack.quant import QuantSpec

    captured = tiny_llama_capture
    before = {name: p.clone() for name, p in captured.module.named_parameters()}
    work = _Work(captured, QuantSpec.from_options("int4", 32), Options(grid=grid))
    steps = {step.name: step for step in STEPS}
    steps["fast path"].run(work)
    floats = {id(p) for p in captured.module.parameters()}
    copied = [name for name, p in work.module.named_parameters() if id(p) not in floats and p.dtype == torch.float32
              and p.dim() == 1]  # norms: not quantized, so the copy must still hold the capture's own
    assert not copied, f"the fast path copied float weights: {copied[:3]}"
    steps["quantize"].run(work)
    quantized = [n for n, m in work.module.named_modules() if isinstance(m, torch.nn.Linear)
                 and type(m.weight).__name__ == "IntxUnpackedToInt8Tensor"]
    assert len(quantized) >= captured.loaded.facts.n_layers * 2  # it did quantize: wide q/k/v and gate/up per layer at least
    for name, p in captured.module.named_parameters():
        assert torch.equal(p, before[name]), f"quantizing for ExecuTorch wrote into the capture's {name}"
