"""The value each pipeline stage hands to the next. Each is immutable and of its own type, so
the order load → capture → lower → package is enforced by what each function accepts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from torch import nn

from edgepack.cases import Case, CaseOutput, Tolerance

Task = Literal["causal-lm", "encoder", "module"]


@dataclass(frozen=True)
class ModelFacts:
    """An architecture's numbers under one vocabulary, whatever the config calls them."""

    family: str
    model_type: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rope_theta: float | None
    tied_embeddings: bool
    # Attention span: layer_types is the config's per-layer kind ("full_attention" /
    # "sliding_attention") when it has one; sliding_window bounds the sliding layers (or every
    # layer when there are no layer_types, as in Mistral).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope: dict | None = None  # the config's rope parameters as given (type, theta, scaling), None for learned positions

    def sliding_layers(self) -> list[bool]:
        """Which layers the sliding window bounds: layer_types' sliding ones, or every layer when
        the config has a window but no layer_types."""
        if self.layer_types:
            return [kind == "sliding_attention" for kind in self.layer_types]
        return [self.sliding_window is not None] * self.n_layers


@dataclass(frozen=True)
class TokenizerFacts:
    """What an app needs to tokenize and stop, derived from the model's own files."""

    directory: Path
    files: tuple[str, ...]
    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int | None
    chat_template: str | None
    add_bos: bool
    runner_check: dict = field(default_factory=dict)  # HF tokenizers vs the on-device runner's tokenizer
    chat_example: dict | None = None  # a two-turn conversation rendered with the template, and its ids
    warnings: tuple[str, ...] = ()  # what the app should know but does not stop the export

    def file_bytes(self, folder: str = "") -> dict[str, bytes]:
        """The source tokenizer files, byte for byte, under `folder` in the bundle."""
        return {f"{folder}{name}": (self.directory / name).read_bytes() for name in self.files}

    def stop_facts(self) -> dict:
        """What a runner beside an artifact reads to tokenize and stop (ONNX's metadata_props, MNN's
        config.json, the .tflite's metadata)."""
        return {"files": list(self.files), "bos_id": self.bos_id, "eos_ids": list(self.eos_ids), "pad_id": self.pad_id,
                "add_bos": self.add_bos, "chat_template": self.chat_template}


@dataclass(frozen=True)
class LoadedModel:
    name: str
    source: str
    source_kind: Literal["hf-dir", "hub", "gguf", "pt2", "factory"]
    task: Task
    module: nn.Module = field(repr=False)
    parameter_count: int
    weight_files: tuple[tuple[str, str], ...] = ()  # (file name, sha256)
    source_quantization: dict | None = None  # a source already quantized (GGUF): how its weights were stored
    hub: dict | None = None  # a hub id's repo_id, the revision asked for and the commit the cache resolved it to
    facts: ModelFacts | None = None
    tokenizer: TokenizerFacts | None = None
    example_inputs: tuple = field(default=(), repr=False)
    dynamic_shapes: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # a str names a dynamic dimension

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class MethodSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_dims: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (min, max)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
            "dynamic_dims": {k: {"min": lo, "max": hi} for k, (lo, hi) in sorted(self.dynamic_dims.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MethodSpec":
        return cls(d["name"], tuple(map(TensorSpec.from_dict, d["inputs"])), tuple(map(TensorSpec.from_dict, d["outputs"])),
                   {k: (v["min"], v["max"]) for k, v in d["dynamic_dims"].items()})


@dataclass(frozen=True)
class CapturedModel:
    """The model in the form every backend lowers: an fp32 module with a fixed calling convention,
    example inputs with their dynamic dimensions, golden cases and the fp32 eager answers."""

    loaded: LoadedModel
    module: nn.Module = field(repr=False)
    example_inputs: tuple = field(repr=False)
    dynamic_shapes: Any = field(repr=False)
    methods: tuple[MethodSpec, ...]
    cases: tuple[Case, ...]
    fp32_outputs: dict[str, CaseOutput] = field(repr=False)
    tolerance: Tolerance
    llm_metadata: dict[str, Any]  # runner-facing facts (bos, eos ids, max seq len, ...)


@dataclass(frozen=True)
class KvCache:
    """How an artifact keeps a decoder's KV cache: the dtype it stores keys and values in and how
    the memory is taken (the manifest's memory report computes the bytes from the model's shape)."""

    dtype: Literal["float32", "float16"]
    # static: the whole context allocated at load; growing: passed in and out, growing with the
    # tokens; runtime: the runtime allocates it for the context the app asks for
    allocation: Literal["static", "growing", "runtime"]


@dataclass(frozen=True)
class RuntimeRecord:
    """The runtime an artifact runs on, as the manifest's artifacts[].runtime states it: its name
    and version, then the backend's own facts (kernel libraries, opset, signatures, ...) in the
    order the backend gives them."""

    name: str
    version: str
    facts: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version, **self.facts}


@dataclass(frozen=True)
class QuantRecord:
    """How an artifact's weights were stored, as the manifest's artifacts[].quantization states it:
    the scheme followed (QuantSpec.describe(), or what the backend's own quantizer did), the
    library that rounded them, then the backend's own facts (grid, ops, stored types, ...)."""

    scheme: Mapping[str, Any]
    library: str
    facts: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {**self.scheme, "library": self.library, **self.facts}


@dataclass(frozen=True)
class Artifact:
    """One backend's product: its files (relative to the bundle), how it was made, and the
    quantized eager answers it must reproduce (built by exporters/lowering.py)."""

    backend: str
    platforms: tuple[str, ...]
    files: dict[str, bytes] = field(repr=False)
    main_file: str
    methods: tuple[MethodSpec, ...]
    quantization: QuantRecord
    ideal_bytes: int
    reference_outputs: dict[str, CaseOutput] = field(repr=False)
    runtime: RuntimeRecord  # runtime name, version, kernel libraries the app must link
    quality: dict  # the quantized eager model vs fp32 on each golden case (the manifest's quantization_quality)
    tolerance: Tolerance | None = None  # the smoke's bounds for this artifact (None: the captured model's)
    warnings: tuple[str, ...] = ()  # what the app should know about this artifact; failures under --strict
    kv_cache: KvCache | None = None  # decoder LMs


@dataclass(frozen=True)
class Bundle:
    path: Path
    archive: Path
    manifest: dict = field(repr=False)
