"""The backends edgepack can lower to, and what the packaging side asks of each (the runtime its
smoke runs on here, on arm64 and in the sample apps; its metadata reader). Modules are imported
only when a backend is used, so `--help` and `doctor` stay fast; adding a backend is adding a row
and a module."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from edgepack.errors import InputError


def _function(path: str) -> Callable:
    """"module:function", imported when first called for."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Arm64Runtime:
    """How an artifact runs under `smoke --on arm64-emulated`: the aarch64 wheel its runtime comes
    from (at the host venv's version), imported by the emulated Python (`imports`, the module its
    self-test imports) or, with `imports` None, linked by edgepack's C++ runner."""

    wheel: str
    imports: str | None


@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str  # exposes Options and lower(captured, quant, options, on_step) -> Artifact
    platforms: tuple[str, ...]
    artifact: str
    distributions: tuple[str, ...]  # what must be installed, for `doctor`
    host_runtime: str  # "module:function": (path, artifact) -> MethodCall, the runtime smoke and quality use here
    arm64: Arm64Runtime | str  # how it runs on arm64-emulated, or why it cannot
    apps: tuple[str, ...]  # the sample apps (platforms) with a runtime for it: what the device smoke runs
    metadata_reader: str | None = None  # "module:function": path -> [(key, value)] for `inspect`

    def load(self):
        return importlib.import_module(self.module)

    def host_call(self, path: Path, artifact: dict):
        """The artifact at `path` loaded in its host runtime: a MethodCall (edgepack.cases)."""
        return _function(self.host_runtime)(path, artifact)

    def embedded_metadata(self, path: Path) -> list[tuple[str, str]]:
        """What the artifact says about itself, read back from the file."""
        return _function(self.metadata_reader)(path) if self.metadata_reader and path.exists() else []

    def options(self, values: Mapping[str, Any]):
        """The backend's own validated Options (a frozen dataclass in its module); a bad value
        raises InputError here, before any slow step."""
        return self.load().Options(**values)


BACKENDS: dict[str, BackendEntry] = {
    "executorch": BackendEntry(
        "executorch", "edgepack.exporters.executorch", ("android", "ios"), "executorch/model.pte",
        ("executorch", "torchao"), "edgepack.packaging.executorch_runtime:executorch_host",
        # its Python runtime links libtorch, whose aarch64 wheel on PyPI is a CUDA build
        Arm64Runtime("executorch", None), apps=("android", "ios"),
    ),
    "coreml": BackendEntry(
        "coreml", "edgepack.exporters.coreml", ("ios",), "coreml/model.mlpackage", ("coremltools",),
        "edgepack.packaging.coreml_mil:coreml_host",
        "CoreML runs only on Apple platforms (Linux checks its MIL program with a numpy evaluator)", apps=("ios",),
    ),
    "tflite": BackendEntry(
        "tflite", "edgepack.exporters.tflite", ("android", "ios"), "tflite/model.tflite",
        ("litert-torch", "ai-edge-quantizer", "ai-edge-litert"), "edgepack.packaging.tflite_runtime:tflite_host",
        Arm64Runtime("ai-edge-litert", "ai_edge_litert.interpreter"), apps=("android",),
        metadata_reader="edgepack.packaging.tflite_metadata:describe_file",
    ),
    "onnx": BackendEntry(
        "onnx", "edgepack.exporters.onnx", ("android", "ios"), "onnx/model.onnx",
        ("onnx", "onnxruntime", "onnxscript"), "edgepack.packaging.onnx_runtime:onnx_host",
        Arm64Runtime("onnxruntime", "onnxruntime"), apps=(),
    ),
}


def resolve_targets(text: str) -> list[BackendEntry]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(BACKENDS.values())
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise InputError(
            f"--target {text!r}: unknown backend {', '.join(map(repr, unknown)) or '(none given)'}",
            hint=f"registered backends: {', '.join(BACKENDS)} (or 'all')",
        )
    return [BACKENDS[n] for n in dict.fromkeys(names)]
