"""Host runtimes that replay a bundle's smoke cases, one loader per backend, imported lazily."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

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


def coreml_host(path: Path, artifact: dict) -> MethodCall:
    """CoreML prediction on macOS; elsewhere a numpy evaluator of the package's MIL program."""
    from edgepack.packaging.coreml_mil import coreml_host as host

    return host(path, artifact)


def tflite_host(path: Path, artifact: dict) -> MethodCall:
    """The LiteRT interpreter (ai_edge_litert) through the .tflite's signatures, caches carried."""
    from edgepack.packaging.tflite_runtime import tflite_host as host

    return host(path, artifact)


def onnx_host(path: Path, artifact: dict) -> MethodCall:
    """ONNX Runtime's InferenceSession (CPU execution provider), KV caches carried for LMs."""
    from edgepack.packaging.onnx_runtime import onnx_host as host

    return host(path, artifact)


HOST_RUNTIMES: dict[str, Callable[[Path, dict], MethodCall]] = {
    "executorch": executorch_host,
    "coreml": coreml_host,
    "tflite": tflite_host,
    "onnx": onnx_host,
}
