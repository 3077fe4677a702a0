"""The Gradle and Swift Package Manager lines an app needs to run a bundle's artifacts.

A .pte must run on an ExecuTorch runtime of the release line that wrote it, and a .tflite on
the LiteRT line that converted it: the lines come from the manifest (artifacts[].runtime.name
and .version, recorded at export) through the one table below. A release line edgepack has not
verified gets a note saying so, never a guessed coordinate."""

from __future__ import annotations

from dataclasses import dataclass

EXECUTORCH_SWIFTPM_URL = "https://github.com/pytorch/executorch.git"


@dataclass(frozen=True)
class Runtimes:
    """What an app links for one runtime release line."""

    gradle: str | None  # Maven coordinate group:artifact:version for Android
    swiftpm_branch: str | None  # ExecuTorch publishes its prebuilt xcframeworks on branches "swiftpm-<version>"


# (manifest runtime name, release line "major.minor") -> coordinates. Evidence (2026-11, read with
# the project's search tools, not fetched from the registries, which these machines cannot reach):
# - org.pytorch:executorch-android:1.5.1: Maven Central has 1.5.1 and no 1.5.0 (several public
#   build.gradle files pin 1.5.1 "to match the executorch that exported the .pte"; the Kotlin
#   Module / LlmModule API the sample app calls is read from pytorch/executorch's sources).
# - swiftpm-1.5.0: a public iOS project (2026-10-08) reports that ExecuTorch has no swiftpm-1.5.1
#   branch and pins swiftpm-1.5.0, noting that no runtime, kernel, XNNPACK or program-format
#   source changed between v1.5.0 and v1.5.1; the branch naming "swiftpm-<version>" is ExecuTorch's
#   documented scheme (docs/source/using-executorch-ios.md).
# - com.google.ai.edge.litert:litert:2.3.0 (Google Maven): the LiteRT release of ai-edge-litert
#   2.3.0; Google's LiteRT GPU guide and public apps pin it. Its Interpreter API (CPU) is what
#   the sample app's smoke test drives, as the Python interpreter does on the host.
RELEASES: dict[tuple[str, str], Runtimes] = {
    ("executorch", "1.5"): Runtimes(gradle="org.pytorch:executorch-android:1.5.1", swiftpm_branch="swiftpm-1.5.0"),
    ("litert", "2.3"): Runtimes(gradle="com.google.ai.edge.litert:litert:2.3.0", swiftpm_branch=None),
}
# The ExecuTorch AAR carries every kernel library; on iOS each is its own SwiftPM product.
EXECUTORCH_IOS_PRODUCTS = ("executorch", "backend_xnnpack", "kernels_optimized")
EXECUTORCH_IOS_KERNELS = {"quantized": "kernels_quantized", "llm_custom_ops": "kernels_llm"}
EXECUTORCH_IOS_LLM_RUNNER = "executorch_llm"  # TextRunner, for the chat screen of a decoder LM


def release_line(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _swiftpm_products(artifact: dict, task: str) -> tuple[list[str], list[str]]:
    """The ExecuTorch products a .pte needs on iOS, and notes on kernels with no known product."""
    products, notes = list(EXECUTORCH_IOS_PRODUCTS), []
    for lib in artifact["runtime"].get("kernel_libraries", []):
        if lib in EXECUTORCH_IOS_KERNELS:
            products.append(EXECUTORCH_IOS_KERNELS[lib])
        else:
            notes.append(f"executorch: the .pte needs kernel library {lib!r}, which edgepack maps to no SwiftPM product")
    if task == "causal-lm":
        products.append(EXECUTORCH_IOS_LLM_RUNNER)
    return products, notes


def integration_snippets(manifest: dict) -> dict:
    """{"gradle": [lines], "swiftpm": [lines], "notes": [...]} for the bundle's artifacts."""
    gradle, swiftpm, notes = [], [], []
    task = manifest["model"]["task"]
    for artifact in manifest["artifacts"]:
        backend, runtime = artifact["backend"], artifact["runtime"]
        if backend == "coreml":
            notes.append(f"coreml: Core ML ships with iOS; the .mlpackage needs {runtime['deployment_target']} "
                         "or later (Package.swift platforms) and no package")
            continue
        line = release_line(runtime["version"])
        known = RELEASES.get((runtime["name"], line))
        if known is None:
            notes.append(f"{backend}: edgepack has no verified app coordinates for {runtime['name']} {line}.x; "
                         f"link the {runtime['name']} {runtime['version']} release line")
            continue
        if "android" in artifact["platforms"] and known.gradle:
            gradle.append(f'implementation("{known.gradle}")')
        if "ios" in artifact["platforms"] and known.swiftpm_branch:
            products, kernel_notes = _swiftpm_products(artifact, task)
            notes += kernel_notes
            swiftpm.append(f'.package(url: "{EXECUTORCH_SWIFTPM_URL}", branch: "{known.swiftpm_branch}")')
            swiftpm += [f'.product(name: "{p}", package: "executorch")' for p in products]
            notes.append("executorch on iOS: link the kernel and backend products with -all_load (or -force_load "
                         "each) so their registrations are kept (ExecuTorch's iOS docs, Linkage)")
        elif "ios" in artifact["platforms"]:
            notes.append(f"{backend} on iOS: the sample app does not link {runtime['name']}; no SwiftPM line")
    return {"gradle": gradle, "swiftpm": swiftpm, "notes": notes}
