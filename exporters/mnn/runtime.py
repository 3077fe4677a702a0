"""MNN on the host: its converter (run in a child process) and the .mnn through its Module API
behind the golden cases' calling convention: LMs with their cache in the caller's hands
(exporters/growing_cache.py), other models by the input names the manifest lists, the outputs in
its order."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

import numpy as np

from edgepack.cases import MethodCall
from edgepack.errors import RuntimeUnavailableError, SmokeFailure
from edgepack.exporters.growing_cache import session_call, takes_cache

# Low: the int4/int8 weights stay packed and MNN quantizes each layer's input to int8 at run time,
# as MNN-LLM apps run it (Normal would expand every weight to fp32 at load). Dynamic quant option 2
# (Interpreter::DYNAMIC_QUANT_OPTIONS): each input quantized per block of the weights' block
# (asymmetric) rather than with one scale per row, which on SmolLM2-135M moved logits' cosine to
# fp32 math from 0.99977 to 0.99999 at no measured cost in speed. MNN-LLM's config calls it
# "dynamic_option".
MEMORY_MODE = "low"
DYNAMIC_QUANT_OPTION = 2
_MEMORY_LOW, _HINT_DYNAMIC_QUANT = 2, 5  # BackendConfig::Memory_Low; Interpreter::DYNAMIC_QUANT_OPTIONS
THREADS = 1
# The converter itself, not MNN/tools/mnnconvert.py: that wrapper reports each conversion to a
# remote log service (and pip-installs its client), which an offline export must never do.
_CONVERT = "import sys, _tools; _tools.mnnconvert(sys.argv)"  # its return value is no status


def runtime_version() -> str:
    try:
        return version("mnn")
    except PackageNotFoundError as e:
        raise RuntimeUnavailableError("MNN is not installed", hint="pip install 'edgepack[mnn]'") from e


def convert(onnx_path: Path, mnn_path: Path, flags: list[str]) -> str:
    """MNN's converter: ONNX -> .mnn with `flags`; its log, or RuntimeError with the log's tail."""
    runtime_version()
    argv = ["mnnconvert", "-f", "ONNX", "--modelFile", str(onnx_path), "--MNNModel", str(mnn_path), *flags]
    done = subprocess.run([sys.executable, "-c", _CONVERT, *argv], capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0 or "Converted Success" not in log or not mnn_path.exists():
        tail = "\n".join(log.strip().splitlines()[-8:])
        raise RuntimeError(f"MNN's converter failed (exit {done.returncode}):\n{tail}")
    return log


def _mnn():
    """The MNN module. Its import prints what the CPU supports on stdout (edgepack's --json
    channel): that line goes to stderr instead."""
    runtime_version()
    if "MNN" not in sys.modules:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        try:
            import MNN  # noqa: F401
        finally:
            ctypes.CDLL(None).fflush(None)  # the C library's buffer, before fd 1 is stdout again
            os.dup2(saved, 1)
            os.close(saved)
    return sys.modules["MNN"]


def stable_model_id(path: Path) -> None:
    """The converter stamps each model with a random UUID (Module::getInfo's uuid, what MNN's
    tools log it by); put one derived from the rest of the file in its place, so the same model
    gives the same bytes (edgepack's bundles are reproducible)."""
    data = path.read_bytes()
    stamp = _mnn().get_model_uuid(str(path)).encode()
    if len(stamp) != 36 or data.count(stamp) != 1:
        raise RuntimeError(f"MNN's model id {stamp!r} is not one 36-character string in {path.name}")
    unstamped = data.replace(stamp, b"0" * 36)
    stable = str(uuid.uuid5(uuid.NAMESPACE_OID, hashlib.sha256(unstamped).hexdigest())).encode()
    path.write_bytes(data.replace(stamp, stable))


def load(path: Path, inputs: list[str], outputs: list[str], threads: int = THREADS):
    MNN = _mnn()
    manager = MNN.nn.create_runtime_manager(({"backend": 0, "numThread": threads, "memory": _MEMORY_LOW},))  # 0: CPU
    manager.set_hint(_HINT_DYNAMIC_QUANT, DYNAMIC_QUANT_OPTION)
    try:
        return MNN.nn.load_module_from_file(str(path), inputs, outputs, runtime_manager=manager)
    except SystemError as e:  # all MNN says is that loading failed
        raise SmokeFailure(f"MNN cannot load {path.name}: not a model this MNN ({runtime_version()}) reads, "
                           "or damaged") from e


def _var(array: np.ndarray):
    F = _mnn().expr
    if array.dtype.kind in "iu":
        return F.const(np.ascontiguousarray(array, dtype=np.int32), list(array.shape), F.NCHW, F.int)
    return F.const(np.ascontiguousarray(array, dtype=np.float32), list(array.shape), F.NCHW)


def _run(module, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.array(out.read(), dtype=np.float32) for out in module.forward([_var(a) for a in arrays])]


def mnn_host(path: Path, artifact: dict) -> MethodCall:
    [method] = artifact["methods"]
    module = load(path, [i["name"] for i in method["inputs"]], [o["name"] for o in method["outputs"]])
    if takes_cache(method):
        return session_call(lambda arrays: _run(module, arrays), method)
    return lambda _, inputs: _run(module, inputs)
