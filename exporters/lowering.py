"""The frame every backend's lowering runs in. A backend (exporters/<name>/lower.py) names its
steps and fills a `Lowered` with what only it knows; this module runs the steps (a failure names
the step) and builds the Artifact: what every backend fills the same way (its name, platforms and
main file from its registry record; the quantized reference's answers, quality and tolerance; the
KV cache for decoder LMs only) is set here, once."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Callable

from edgepack.errors import BackendError, EdgepackError
from edgepack.exporters.backend import Backend
from edgepack.exporters.capture import Reference
from edgepack.quant import QuantSpec
from edgepack.stages import Artifact, CapturedModel, KvCache, MethodSpec, QuantRecord, RuntimeRecord


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Any], None]  # reads and sets attributes of the lowering's work object


@dataclass
class Lowering:
    """What a backend's steps share: the inputs, and the two products every lowering makes (the
    quantized eager reference, and the artifact's files by bundle path). A backend's own work
    type extends it with its intermediate products."""

    captured: CapturedModel
    quant: QuantSpec
    options: Any  # the backend's Options
    reference: Reference | None = field(default=None, kw_only=True)  # set by the backend's "reference" step
    files: dict[str, bytes] = field(default_factory=dict, kw_only=True)


@dataclass(frozen=True)
class Lowered:
    """What one backend's lowering made, as only it can say."""

    files: dict[str, bytes]  # by bundle path; the main file at the backend record's `artifact`
    quantization: QuantRecord
    ideal_bytes: int  # the weights at the bits the scheme stores them, scales included
    runtime: RuntimeRecord
    reference: Reference
    kv_cache: KvCache | None = None  # for decoder LMs; ignored for other tasks
    methods: tuple[MethodSpec, ...] | None = None  # None: the captured model's
    warnings: tuple[str, ...] = ()


def run_steps(backend: str, steps: tuple[Step, ...], work: Any,
              on_step: Callable[[str], None] | None = None) -> Any:
    for step in steps:
        if on_step:
            on_step(step.name)
        try:
            step.run(work)
        except EdgepackError as e:
            e.step = e.step or step.name  # an input refused mid-lowering still says where
            raise
        except Exception as e:  # a converter's own exception: keep it, name the step
            raise BackendError(backend, step.name, f"{type(e).__name__}: {e}",
                               hint="run with --verbose for the full traceback") from e
    return work


def lower(backend: Backend, captured: CapturedModel, quant: QuantSpec, options: Any,
          on_step: Callable[[str], None] | None = None) -> Artifact:
    """The backend's artifact of `captured` at `quant`."""
    made: Lowered = backend.load().lower(captured, quant, options, on_step)
    # A backend's working copies of the weights can sit in reference cycles (MNN's rounded copy:
    # its lookups' forward closures hold their layers), which Python's collector may not visit
    # before the smoke: gigabytes for a 1B model. They go now.
    gc.collect()
    if backend.artifact not in made.files and not any(f.startswith(f"{backend.artifact}/") for f in made.files):
        raise BackendError(backend.name, "record", f"the lowering wrote no {backend.artifact}")
    return Artifact(
        backend=backend.name,
        platforms=backend.platforms,
        files=made.files,
        main_file=backend.artifact,
        methods=made.methods or captured.methods,
        quantization=made.quantization,
        ideal_bytes=made.ideal_bytes,
        reference_outputs=made.reference.outputs,
        runtime=made.runtime,
        quality=made.reference.quality,
        tolerance=made.reference.tolerance,
        warnings=made.warnings,
        kv_cache=made.kv_cache if captured.loaded.task == "causal-lm" else None,
    )
