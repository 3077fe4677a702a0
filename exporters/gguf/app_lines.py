"""What an app links to run the .gguf: llama.cpp at the commit the smoke ran (the one
llama-cpp-python vendors), and what the file says about itself for `edgepack inspect`."""

from __future__ import annotations

from collections import Counter
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
    """What llama.cpp will read from the .gguf, in brief: its architecture and context, the
    tokenizer it carries, the special ids, and its tensors by type."""
    import gguf

    reader = gguf.GGUFReader(path)

    def value(key: str) -> str | None:
        field = reader.fields.get(key)
        return None if field is None else str(field.contents())

    arch = value("general.architecture")
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    ids = [f"{name} {value(f'tokenizer.ggml.{key}_token_id')}" for name, key in
           (("bos", "bos"), ("eos", "eos"), ("eot", "eot"), ("pad", "padding")) if value(f"tokenizer.ggml.{key}_token_id")]
    rows = [("architecture", f"{arch}, {value(f'{arch}.block_count')} blocks, context {value(f'{arch}.context_length')}"),
            ("tokenizer", f"{value('tokenizer.ggml.model')}, pre-tokenizer {value('tokenizer.ggml.pre')}, "
                          f"{len(reader.fields['tokenizer.ggml.tokens'].data)} tokens"),
            ("special ids", ", ".join(ids)),
            ("chat template", "present" if value("tokenizer.chat_template") else "none"),
            ("tensors", ", ".join(f"{n} {k}" for k, n in sorted(types.items())))]
    return rows
