"""The .onnx on ONNX Runtime (InferenceSession, CPU execution provider: the kernels ONNX Runtime
Mobile runs on Android and iOS), behind the golden cases' calling convention: LMs as
onnxruntime-genai drives them (exporters/growing_cache.py), other models by the input names the
manifest lists, the outputs in its order."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgepack.cases import MethodCall
from edgepack.errors import RuntimeUnavailableError
from edgepack.exporters.growing_cache import session_call, takes_cache


def session(path: Path, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeUnavailableError("ONNX Runtime is not installed", hint="pip install 'edgepack[onnx]'") from e
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_host(path: Path, artifact: dict) -> MethodCall:
    sess = session(path)
    [method] = artifact["methods"]
    names = [i["name"] for i in method["inputs"]]
    outputs = [o["name"] for o in method["outputs"]]

    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return sess.run(outputs, {n: np.ascontiguousarray(x) for n, x in zip(names, arrays)})

    if takes_cache(method):
        return session_call(run, method)
    return lambda _, inputs: run(inputs)
