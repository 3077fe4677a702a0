"""What a backend is to the rest of edgepack: one `Backend` record in its folder's `__init__.py`
(exporters/<name>/), naming the modules that do the work. The pipeline, the bundle writer and the
smoke drivers ask these records and key nothing by backend name. Modules are imported only when a
backend is used, so `--help` and `doctor` stay fast."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping


def function(path: str) -> Callable:
    """"module:function", imported when first called for."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


# The int4 grids a backend's options may offer (--onnx-grid, --coreml-grid). offset: each block
# spans its own [min, max] (GGUF Q4_1's grid, weights.quantize_min_max), so a source already on it
# survives; symmetric: the backend's own quantizer grid around zero (weights.Rounding).
INT4_GRIDS = ("offset", "symmetric")


def flag(name: str, help: str, type: Any, multiple: bool = False) -> dict:
    """An Options field's command-line flag (dataclasses.field metadata): `edgepack export` grows
    one option per field, in the backend's own help panel, typed `type` (repeatable if
    `multiple`); leaving it out keeps the field's default."""
    return {"flag": name, "help": help, "type": type, "multiple": multiple}


@dataclass(frozen=True)
class NativeRunner:
    """A C++ program built by `make arm64-env` against the backend's aarch64 wheel (its cmake
    config), that runs the artifact under qemu while the host drives it call by call."""

    binary: str  # the executable's name under build/arm64/<wheel>/bin/
    source: Path  # the folder with its CMakeLists.txt
    start: str  # "module:function": (env, artifact path) -> a context manager with .call (a MethodCall)
    self_test: str  # "module:function": (env) -> a line on what the built runner provides, or raises
    note: str  # how running there differs from an app's runtime, shown with every result


@dataclass(frozen=True)
class CrossBuild:
    """What `make arm64-env` hands a source build: the aarch64 cross toolchain as a CMake toolchain
    file, the CMake to run, the environment the unpacked compiler needs, and the cores to use."""

    cmake: Path
    toolchain: Path
    env: Mapping[str, str]
    jobs: int


@dataclass(frozen=True)
class Arm64Runtime:
    """How an artifact runs under `smoke --on arm64-emulated`: the aarch64 wheel its runtime comes
    from (at the host venv's version), imported by the emulated Python (`imports`, the module its
    self-test imports) or, with `runner`, linked by a native runner. A runtime PyPI ships only as
    source has a `build` instead of a wheel: it compiles the package for aarch64 into the emulated
    Python's path, and `requires` names the pure-Python distributions that package imports."""

    wheel: str
    imports: str | None = None
    runner: NativeRunner | None = None
    # "module:function": (site folder, host version, CrossBuild) -> a line on what was built
    build: str | None = None
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompanionCheck:
    """A second runtime that checks a file written beside the artifact (the .tflite's .litertlm on
    the LiteRT-LM engine): its own row in the smoke results, named `name`."""

    name: str
    runtime: str  # the row's runtime, as the smoke table shows it
    label: str  # its line in the export summary and `inspect`
    file_key: str  # the artifact's runtime field holding the file's bundle path, when one was written
    # "module:function": (bundle, manifest, artifact, [(case, expected)], the artifact's own smoke
    # cases' metrics) -> {case: metrics with "failures"}
    run: str
    describe: str  # "module:function": (its smoke row as a dict) -> one line
    arm64: str  # why it does not run on arm64-emulated


@dataclass(frozen=True)
class Backend:
    name: str
    title: str  # as users know it: help panels and tables
    lower: str  # module exposing lower(captured, quant, options, on_step) -> Lowered (exporters/lowering.py)
    # "module:Options": a frozen dataclass; its fields (with `flag` metadata) become CLI flags, and
    # its int4_grid names the INT4_GRIDS entry its int4 blocks are stored on (the precision plan's),
    # or is None where the backend's own quantizer chooses each tensor's type (no plan is made for it)
    options: str
    platforms: tuple[str, ...]
    artifact: str
    distributions: tuple[str, ...]  # what must be installed, for `doctor`
    # what it also uses when installed; both are recorded in the manifest's toolchain
    optional_distributions: tuple[str, ...]
    host_runtime: str  # "module:function": (path, artifact) -> MethodCall, the runtime smoke and quality use here
    arm64: Arm64Runtime | str  # how it runs on arm64-emulated, or why it cannot
    apps: tuple[str, ...]  # the sample apps (platforms) with a runtime for it: what the device smoke runs
    app_lines: str  # "module:function": (artifact, task) -> AppLines, what an app links to run it
    metadata_reader: str | None = None  # "module:function": path -> [(key, value)] for `inspect`
    companions: tuple[CompanionCheck, ...] = ()
    # "module:function": (LoadedModel, QuantSpec) -> why this backend cannot take the model at that
    # quantization, or None (it takes any)
    refusal: str | None = None
    # "module:function": (LoadedModel, max_seq_len) -> why it cannot take a decoder LM at that cache
    # length, or None
    length_refusal: str | None = None

    def load(self):
        return importlib.import_module(self.lower)

    def options_type(self) -> type:
        return function(self.options)

    def validated_options(self, values: Mapping[str, Any]):
        """The backend's own validated Options; a bad value raises InputError here, before any
        slow step."""
        return self.options_type()(**values)

    def flags(self) -> list[tuple[dataclasses.Field, dict]]:
        """The Options fields offered on the command line, with their flag metadata."""
        return [(f, f.metadata) for f in dataclasses.fields(self.options_type()) if "flag" in f.metadata]

    def host_call(self, path: Path, artifact: dict):
        """The artifact at `path` loaded in its host runtime: a MethodCall (edgepack.cases)."""
        return function(self.host_runtime)(path, artifact)

    def embedded_metadata(self, path: Path) -> list[tuple[str, str]]:
        """What the artifact says about itself, read back from the file."""
        return function(self.metadata_reader)(path) if self.metadata_reader and path.exists() else []

    def refuses(self, loaded, quant, max_seq_len: int | None = None) -> str | None:
        """Why the backend cannot lower `loaded` at `quant` (a task, family or grid it has no form
        for), or a decoder LM at a cache of `max_seq_len`, or None."""
        reason = function(self.refusal)(loaded, quant) if self.refusal else None
        if reason is None and max_seq_len is not None and self.length_refusal:
            reason = function(self.length_refusal)(loaded, max_seq_len)
        return reason

    def app_lines_for(self, artifact: dict, task: str) -> "AppLines":
        return function(self.app_lines)(artifact, task)


@dataclass(frozen=True)
class AppLines:
    """What an app adds to run one artifact: Gradle dependency lines, Package.swift lines, notes."""

    gradle: tuple[str, ...] = ()
    swiftpm: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def release_line(version: str) -> str:
    """"1.5.1+cpu" -> "1.5": app coordinates are verified per release line."""
    return ".".join(version.split("+")[0].split(".")[:2])


def unverified_release(artifact: dict, task: str | None = None) -> AppLines:
    """The note for a runtime release line with no verified app coordinates (an app_lines)."""
    runtime = artifact["runtime"]
    line = release_line(runtime["version"])
    return AppLines(notes=(f"{artifact['backend']}: edgepack has no verified app coordinates for {runtime['name']} "
                           f"{line}.x; link the {runtime['name']} {runtime['version']} release line",))
