"""The Gradle and Swift Package Manager lines an app links to run a .pte. A .pte must run on an
ExecuTorch runtime of the release line that wrote it: the line comes from the manifest
(artifacts[].runtime.version, recorded at export). A line edgepack has not verified gets a note
saying so, never a guessed coordinate."""

from __future__ import annotations

from edgepack.exporters.backend import AppLines, release_line, unverified_release

SWIFTPM_URL = "https://github.com/pytorch/executorch.git"
# Release line -> (Maven coordinate, SwiftPM branch). Evidence (2026-11, read with the project's
# search tools, not fetched from the registries, which these machines cannot reach):
# - org.pytorch:executorch-android:1.5.1: Maven Central has 1.5.1 and no 1.5.0 (several public
#   build.gradle files pin 1.5.1 "to match the executorch that exported the .pte"; the Kotlin
#   Module / LlmModule API the sample app calls is read from pytorch/executorch's sources).
# - swiftpm-1.5.0: a public iOS project (2026-10-08) reports that ExecuTorch has no swiftpm-1.5.1
#   branch and pins swiftpm-1.5.0, noting that no runtime, kernel, XNNPACK or program-format
#   source changed between v1.5.0 and v1.5.1; the branch naming "swiftpm-<version>" is ExecuTorch's
#   documented scheme (docs/source/using-executorch-ios.md).
RELEASES = {"1.5": ("org.pytorch:executorch-android:1.5.1", "swiftpm-1.5.0")}
# The AAR carries every kernel library; on iOS each is its own SwiftPM product.
IOS_PRODUCTS = ("executorch", "backend_xnnpack", "kernels_optimized")
IOS_KERNELS = {"quantized": "kernels_quantized", "llm_custom_ops": "kernels_llm"}
IOS_LLM_RUNNER = "executorch_llm"  # TextRunner, for the chat screen of a decoder LM


def app_lines(artifact: dict, task: str) -> AppLines:
    runtime = artifact["runtime"]
    known = RELEASES.get(release_line(runtime["version"]))
    if known is None:
        return unverified_release(artifact)
    maven, branch = known
    gradle = (f'implementation("{maven}")',) if "android" in artifact["platforms"] else ()
    if "ios" not in artifact["platforms"]:
        return AppLines(gradle)
    products, notes = _swiftpm_products(artifact, task)
    swiftpm = (f'.package(url: "{SWIFTPM_URL}", branch: "{branch}")',
               *(f'.product(name: "{p}", package: "executorch")' for p in products))
    notes.append("executorch on iOS: link the kernel and backend products with -all_load (or -force_load "
                 "each) so their registrations are kept (ExecuTorch's iOS docs, Linkage)")
    return AppLines(gradle, swiftpm, tuple(notes))


def _swiftpm_products(artifact: dict, task: str) -> tuple[list[str], list[str]]:
    """The products a .pte needs on iOS, and notes on kernels with no known product."""
    products, notes = list(IOS_PRODUCTS), []
    for lib in artifact["runtime"].get("kernel_libraries", []):
        if lib in IOS_KERNELS:
            products.append(IOS_KERNELS[lib])
        else:
            notes.append(f"executorch: the .pte needs kernel library {lib!r}, which edgepack maps to no SwiftPM product")
    if task == "causal-lm":
        products.append(IOS_LLM_RUNNER)
    return products, notes
