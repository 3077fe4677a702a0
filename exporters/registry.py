"""The backends edgepack lowers to: one line each. A backend is its folder, exporters/<name>/,
whose `BACKEND` (exporters/backend.py's record) says everything the rest of edgepack asks of it."""

from __future__ import annotations

import importlib

from edgepack.errors import InputError
from edgepack.exporters.backend import Backend

BACKENDS: dict[str, Backend] = {
    backend.name: backend for backend in (
        importlib.import_module(f"edgepack.exporters.{folder}").BACKEND
        for folder in (
            "executorch",
            "coreml",
            "tflite",
            "onnx",
            "gguf",
            "mnn",
        ))
}
DEFAULT_TARGET = "executorch"  # what `edgepack export` lowers to without --target


def target_names(text: str) -> list[str]:
    """--target as the names it lists ("all" stays a name)."""
    return [n.strip() for n in text.split(",") if n.strip()]


def resolve_targets(text: str) -> list[Backend]:
    names = target_names(text)
    if names == ["all"]:
        return list(BACKENDS.values())
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise InputError(
            f"--target {text!r}: unknown backend {', '.join(map(repr, unknown)) or '(none given)'}",
            hint=f"registered backends: {', '.join(BACKENDS)} (or 'all')",
        )
    return [BACKENDS[n] for n in dict.fromkeys(names)]
