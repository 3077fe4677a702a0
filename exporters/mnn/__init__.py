"""MNN: a model.mnn for Alibaba's MNN runtime (its Module API, as MNN's Android and iOS builds load
it), converted from the captured model's ONNX graph by MNN's own converter with 4-bit block
weights; decoder LMs keep the KV cache as inputs and outputs (exporters/onnx_capture.py)."""

from edgepack.exporters.backend import Arm64Runtime, Backend

BACKEND = Backend(
    name="mnn", title="MNN", lower="edgepack.exporters.mnn.lower",
    options="edgepack.exporters.mnn.options:Options",
    platforms=("android", "ios"), artifact="mnn/model.mnn", distributions=("mnn", "onnx", "onnxscript"),
    optional_distributions=(),
    host_runtime="edgepack.exporters.mnn.runtime:mnn_host",
    arm64=Arm64Runtime("mnn", imports="MNN"),
    apps=(), app_lines="edgepack.exporters.mnn.app_lines:app_lines",
    metadata_reader="edgepack.exporters.mnn.app_lines:describe_file",
    refusal="edgepack.exporters.mnn.lower:refusal",
)
