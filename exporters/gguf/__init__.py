"""GGUF: a self-contained .gguf (weights, hyperparameters, tokenizer, chat template) for llama.cpp,
the runtime apps embed through its Android (JNI) and iOS (XCFramework) builds, React Native's
llama.rn and others; decoder LMs of the families llama.cpp and edgepack share."""

from edgepack.exporters.backend import Arm64Runtime, Backend

BACKEND = Backend(
    name="gguf", title="llama.cpp (GGUF)", lower="edgepack.exporters.gguf.lower",
    options="edgepack.exporters.gguf.options:Options",
    platforms=("android", "ios"), artifact="gguf/model.gguf", distributions=("gguf", "llama-cpp-python"),
    optional_distributions=(),
    host_runtime="edgepack.exporters.gguf.runtime:llama_cpp_host",
    # PyPI has no aarch64 wheel: make arm64-env cross-compiles the pinned sdist (exporters/gguf/arm64.py)
    arm64=Arm64Runtime("llama-cpp-python", imports="llama_cpp", build="edgepack.exporters.gguf.arm64:build_llama_cpp",
                       requires=("diskcache", "jinja2", "markupsafe", "typing-extensions")),
    apps=(), app_lines="edgepack.exporters.gguf.app_lines:app_lines",
    metadata_reader="edgepack.exporters.gguf.app_lines:describe_file",
    refusal="edgepack.exporters.gguf.lower:refusal", length_refusal="edgepack.exporters.gguf.lower:length_refusal",
)
