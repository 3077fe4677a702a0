"""TFLite: a .tflite for LiteRT (int4 block-wise weights by ai-edge-quantizer), Android and iOS;
optionally a .litertlm bundle for the LiteRT-LM engine, checked on that engine."""

from edgepack.exporters.backend import Arm64Runtime, Backend, CompanionCheck

BACKEND = Backend(
    name="tflite", title="TFLite", lower="edgepack.exporters.tflite.lower",
    options="edgepack.exporters.tflite.options:Options",
    platforms=("android", "ios"), artifact="tflite/model.tflite",
    distributions=("litert-torch", "ai-edge-quantizer", "ai-edge-litert"),
    optional_distributions=("litert-lm-builder",),
    host_runtime="edgepack.exporters.tflite.runtime:tflite_host",
    arm64=Arm64Runtime("ai-edge-litert", imports="ai_edge_litert.interpreter"),
    apps=("android",), app_lines="edgepack.exporters.tflite.app_lines:app_lines",
    metadata_reader="edgepack.exporters.tflite.metadata:describe_file",
    refusal="edgepack.exporters.tflite.lower:refusal",
    companions=(CompanionCheck(
        name="litertlm", runtime="LiteRT-LM engine (host)", label=".litertlm on LiteRT-LM", file_key="litertlm",
        run="edgepack.exporters.tflite.litertlm_engine:check_on_engine",
        describe="edgepack.exporters.tflite.litertlm_engine:describe",
        arm64="the LiteRT-LM engine (litert-lm-api 0.18.1) has no aarch64 wheel: host only"),),
)
