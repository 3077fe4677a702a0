"""ExecuTorch: a .pte for the ExecuTorch runtime (XNNPACK delegate, int8 dynamic activations, int4 weights), Android and iOS."""

from pathlib import Path

from edgepack.exporters.backend import Arm64Runtime, Backend, NativeRunner

# What the arm64 runner provides itself instead of ExecuTorch's own kernels (said with each result).
RUNNER_OPS = ("llama::update_cache.out", "llama::custom_sdpa.out")
BACKEND = Backend(
    name="executorch", title="ExecuTorch", lower="edgepack.exporters.executorch.lower",
    options="edgepack.exporters.executorch.options:Options",
    platforms=("android", "ios"), artifact="executorch/model.pte",
    distributions=("executorch", "torchao"), optional_distributions=("pytorch-tokenizers",),
    host_runtime="edgepack.exporters.executorch.runtime:executorch_host",
    # Its Python runtime links libtorch, whose aarch64 wheel on PyPI is a CUDA build: on arm64 the
    # .pte runs in edgepack's C++ runner against the wheel's C++ runtime.
    arm64=Arm64Runtime("executorch", runner=NativeRunner(
        binary="edgepack-et-runner", source=Path(__file__).resolve().parent / "runner",
        start="edgepack.exporters.executorch.arm64:start_on",
        self_test="edgepack.exporters.executorch.arm64:self_test",
        note="ran in edgepack-et-runner, edgepack's C++ runner linked against the aarch64 executorch wheel's "
             f"runtime, XNNPACK delegate and kernels; {' and '.join(RUNNER_OPS)} are the runner's own "
             "implementations (ExecuTorch ships them only in a library that links libtorch)")),
    apps=("android", "ios"), app_lines="edgepack.exporters.executorch.app_lines:app_lines",
)
