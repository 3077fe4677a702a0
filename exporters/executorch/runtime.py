"""The ExecuTorch runtime on this host (its Python binding), as the smoke and quality stages call it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

import numpy as np

from edgepack.cases import MethodCall
from edgepack.errors import RuntimeUnavailableError

# kernel library name in the manifest -> the Python module that registers it in the host runtime
_ET_KERNEL_MODULES = {
    "quantized": "executorch.kernels.quantized",
    "llm_custom_ops": "executorch.extension.llm.custom_ops.custom_ops",
}


def executorch_host(path: Path, artifact: dict) -> MethodCall:
    """The ExecuTorch runtime's Python binding: the same C++ runtime and XNNPACK kernels apps link."""
    try:
        import torch
        from executorch.runtime import Runtime
    except ImportError as e:
        raise RuntimeUnavailableError("the ExecuTorch runtime is not installed",
                                      hint="pip install 'edgepack[executorch]'") from e
    for lib in artifact["runtime"].get("kernel_libraries", []):
        importlib.import_module(_ET_KERNEL_MODULES[lib])
    program = Runtime.get().load_program(path)
    methods: dict = {}

    def call(method: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if method not in methods:
            methods[method] = program.load_method(method)
        outputs = methods[method].execute([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        return [o.numpy() for o in outputs]

    return call
