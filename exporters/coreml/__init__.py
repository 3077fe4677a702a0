"""CoreML: an ML program in a .mlpackage (stateful KV cache, int4 per-block weights), iOS."""

from edgepack.exporters.backend import Backend

BACKEND = Backend(
    name="coreml", title="CoreML", lower="edgepack.exporters.coreml.lower",
    options="edgepack.exporters.coreml.options:Options",
    platforms=("ios",), artifact="coreml/model.mlpackage", distributions=("coremltools",), optional_distributions=(),
    host_runtime="edgepack.exporters.coreml.mil:coreml_host",
    arm64="CoreML runs only on Apple platforms (Linux checks its MIL program with a numpy evaluator)",
    apps=("ios",), app_lines="edgepack.exporters.coreml.app_lines:app_lines",
    length_refusal="edgepack.exporters.coreml.lower:length_refusal",
)
