"""What an app links to run the .gguf: llama.cpp at the commit the smoke ran (the one
llama-cpp-python vendors), and what the file says about itself for `edgepack inspect`."""

from __future__ import annotations

from pathlib import Path

from edgepack.exporters.backend import AppLines, unverified_release

# llama-cpp-python release -> the llama.cpp commit it vendors (its CHANGELOG): what the smoke ran.
VENDORED_LLAMA_CPP = {"0.3.36": "0c1e57098"}


def app_lines(artifact: dict, task: str) -> AppLines:
    commit = VENDORED_LLAMA_CPP.get(artifact["runtime"]["version"])
    if commit is None:
        return unverified_release(artifact)
    return AppLines(notes=(
        f"{artifact['backend']}: the smoke ran llama.cpp at ggml-org/llama.cpp@{commit} (llama-cpp-python "
        f"{artifact['runtime']['version']}); build the app's llama.cpp from that commit or a later release",
        f"{artifact['backend']} on Android: llama.cpp's examples/llama.android library module (JNI, CMake; "
        "arm64-v8a), or llama.rn in React Native apps",
        f"{artifact['backend']} on iOS: the llama.xcframework of a llama.cpp release as a SwiftPM binaryTarget "
        "(docs/xcframework.md in llama.cpp), or llama.rn",
    ))


def describe_file(path: Path) -> list[tuple[str, str]]:
    """The .gguf's own metadata (tokenizer arrays summarized), as llama.cpp will read it."""
    import gguf

    reader = gguf.GGUFReader(path)
    rows = []
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = fld.contents()
        if isinstance(value, list):
            value = f"[{len(value)} entries]"
        rows.append((key, str(value)[:120]))
    return rows
