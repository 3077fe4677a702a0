"""ExecuTorch's quantized copy of a captured decoder shares the capture's float weights and
never writes into them: a second float copy would be another 5 GB on a 1B model (bench.scale),
and a write would corrupt what the other backends and the quality stage read after it. And the
kernel calls a forward makes outside XNNPACK, counted in the .pte."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ExecutorchMethod


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


@pytest.mark.slow
def test_split_outputs_and_rotary_save_kernel_calls_and_change_no_logits(tiny_llama_capture):
    """XNNPACK's partitioner takes no slice over the dynamic token length, so every slice is a
    kernel call of its own between delegate calls. A wide linear's output (q/k/v, gate/up) and each
    rotary half-turn are split by one kernel, and cos/sin are widened to the heads once a forward:
    against transformers' own rotary (two slices a tensor and an unsqueeze of cos and sin a layer)
    that is 2 slice and 2 unsqueeze calls a layer fewer, no slice left inside a layer, and, through
    the ExecuTorch runtime, the same logits to the bit."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama::*)
    from executorch.kernels import quantized  # noqa: F401  (embedding_4bit)

    from bench.run import kernel_calls
    from edgepack.exporters.executorch import BACKEND
    from edgepack.exporters.executorch.lower import STEPS, _Work
    from edgepack.exporters.executorch.options import Options
    from edgepack.quant import QuantSpec

    captured, layers = tiny_llama_capture, tiny_llama_capture.loaded.facts.n_layers

    def pte(rotary_by_split: bool) -> bytes:
        work = _Work(captured, QuantSpec.from_options("int4", 32), Options(grid="offset"))
        for step in STEPS:
            if step.name != "reference":
                step.run(work)
            if step.name == "fast path" and not rotary_by_split:
                work.module.rotary_families = ()
        return work.files[BACKEND.artifact]

    def logits(program: bytes) -> torch.Tensor:
        method = ExecutorchMethod(program)
        prompt = method([torch.tensor([[5, 9, 17, 3, 22]]), torch.tensor([0])])[0].clone()
        return torch.cat([prompt, method([torch.tensor([[13]]), torch.tensor([5])])[0]])

    split, sliced = pte(True), pte(False)
    calls, plain = kernel_calls(split), kernel_calls(sliced)
    assert plain["aten::slice_copy"] - calls["aten::slice_copy"] == 4 * layers
    assert calls["aten::split_with_sizes_copy"] - plain["aten::split_with_sizes_copy"] == 2 * layers
    assert plain["aten::unsqueeze_copy"] - calls["aten::unsqueeze_copy"] == 2 * layers - 2
    assert calls["aten::slice_copy"] < layers  # none inside a layer: the wide linears' outputs are split too
    new, old = logits(split), logits(sliced)
    assert torch.equal(new, old) and new.abs().max() > 0.1
