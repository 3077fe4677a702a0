"""ONNX: a model.onnx for ONNX Runtime (Mobile) with MatMulNBits int4 weights, laid out for
onnxruntime-genai (genai_config.json beside it), Android and iOS."""

from edgepack.exporters.backend import Arm64Runtime, Backend, CompanionCheck

BACKEND = Backend(
    name="onnx", title="ONNX", lower="edgepack.exporters.onnx.lower",
    options="edgepack.exporters.onnx.options:Options",
    platforms=("android", "ios"), artifact="onnx/model.onnx",
    distributions=("onnx", "onnxruntime", "onnxscript", "onnxruntime-genai"), optional_distributions=(),
    host_runtime="edgepack.exporters.onnx.runtime:onnx_host",
    arm64=Arm64Runtime("onnxruntime", imports="onnxruntime"),
    apps=(), app_lines="edgepack.exporters.backend:unverified_release",
    refusal="edgepack.exporters.onnx.lower:refusal",
    companions=(CompanionCheck(
        name="genai", runtime="onnxruntime-genai (host)", label="onnx/ on onnxruntime-genai", file_key="genai_config",
        run="edgepack.exporters.onnx.genai_check:check_on_genai", describe="edgepack.report:describe_fidelity",
        arm64="onnxruntime-genai runs on the host only here (the emulated arm64 Python has ONNX Runtime alone)"),),
)
