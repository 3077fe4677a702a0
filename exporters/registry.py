"""The backends edgepack can lower to. Modules are imported only when a backend is used, so
`--help` and `doctor` stay fast; adding a backend is adding a row and a module."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping

from edgepack.errors import InputError


@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str  # exposes Options and lower(captured, quant, options, on_step) -> Artifact
    platforms: tuple[str, ...]
    artifact: str
    distributions: tuple[str, ...]  # what must be installed, for `doctor`

    def load(self):
        return importlib.import_module(self.module)

    def options(self, values: Mapping[str, Any]):
        """The backend's own validated Options (a frozen dataclass in its module); a bad value
        raises InputError here, before any slow step."""
        return self.load().Options(**values)


BACKENDS: dict[str, BackendEntry] = {
    "executorch": BackendEntry(
        "executorch", "edgepack.exporters.executorch", ("android", "ios"), "executorch/model.pte",
        ("executorch", "torchao"),
    ),
    "coreml": BackendEntry(
        "coreml", "edgepack.exporters.coreml", ("ios",), "coreml/model.mlpackage", ("coremltools",),
    ),
    "tflite": BackendEntry(
        "tflite", "edgepack.exporters.tflite", ("android", "ios"), "tflite/model.tflite",
        ("litert-torch", "ai-edge-quantizer", "ai-edge-litert"),
    ),
    "onnx": BackendEntry(
        "onnx", "edgepack.exporters.onnx", ("android", "ios"), "onnx/model.onnx",
        ("onnx", "onnxruntime", "onnxscript"),
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
