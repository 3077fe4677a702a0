"""What an app links to run the .mnn (MNN's release at the version the smoke ran), and what the
file says about itself for `edgepack inspect`."""

from __future__ import annotations

from pathlib import Path

from edgepack.exporters.backend import AppLines, release_line


def app_lines(artifact: dict, task: str) -> AppLines:
    runtime = artifact["runtime"]
    release, name = runtime["version"], artifact["backend"]
    return AppLines(notes=(
        f"{name}: the smoke ran MNN {release} (PyPI mnn) with the Express Module API on the CPU backend, "
        f"memory mode {runtime['memory_mode']} and dynamic quant option {runtime['dynamic_quant_option']} "
        f"(Interpreter::DYNAMIC_QUANT_OPTIONS; MNN-LLM's \"dynamic_option\"); link MNN {release_line(release)}.x or later, built from "
        "alibaba/MNN at that release",
        f"{name} on Android: libMNN.so and libMNN_Express.so from MNN's Android build (project/android, arm64-v8a, "
        "MNN_LOW_MEMORY=ON for packed 4-bit weights), loaded with MNN::Express::Module::load(inputs, outputs, "
        "\"model.mnn\") over JNI",
        f"{name} on iOS: MNN.framework from MNN's iOS build (package_scripts/ios, MNN_LOW_MEMORY=ON), "
        "the same Module::load call from Objective-C++",
        f"{name}: {runtime['config']} names the inputs and outputs, the KV cache's layout and the stop tokens"
        if task == "causal-lm" else f"{name}: {runtime['config']} names the inputs and outputs",
    ))


def describe_file(path: Path) -> list[tuple[str, str]]:
    """What MNN reads from the .mnn: the converter's version, who made it, the I/O names."""
    from edgepack.errors import SmokeFailure
    from edgepack.exporters.mnn.runtime import load

    try:
        info = load(path, [], []).get_info()
    except SmokeFailure as e:
        return [("file", str(e))]
    inputs, outputs = info["inputNames"], info["outputNames"]
    return [("made by", f"{info['bizCode']} (MNN converter {info['version']})"),
            ("inputs", f"{len(inputs)}: {', '.join(inputs[:3])}{' ...' if len(inputs) > 3 else ''}"),
            ("outputs", f"{len(outputs)}: {', '.join(outputs[:3])}{' ...' if len(outputs) > 3 else ''}")]
