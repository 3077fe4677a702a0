"""TFLite model metadata (the tflite-support schema): the model's name, version, description,
author and license, tensor metadata, and associated files packed inside the .tflite — the
tokenizer files byte for byte and a JSON of the tokenizer and generation facts — so an app that
receives only the .tflite still has them. Read back with the schema's own MetadataDisplayer.

tflite-support is imported by its metadata modules only: importing `tflite_support` itself fails
on the protobuf these environments need (see ENVIRONMENT.md)."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import InputError, RuntimeUnavailableError

FACTS_FILE = "edgepack.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class TensorDoc:
    name: str
    description: str


@dataclass(frozen=True)
class ModelDoc:
    """What goes into the metadata. `tensors` documents subgraph 0 (the schema allows exactly one
    SubgraphMetadata, bound to the first subgraph); every signature is described in `facts`."""

    name: str
    version: str
    description: str
    author: str
    license: str
    inputs: tuple[TensorDoc, ...]
    outputs: tuple[TensorDoc, ...]
    facts: dict  # written as FACTS_FILE
    files: dict[str, bytes]  # associated files (the tokenizer), name -> bytes


def _schema():
    try:
        from tensorflow_lite_support.metadata import metadata_schema_py_generated as fb
        from tensorflow_lite_support.metadata.python import metadata
    except ImportError as e:
        raise RuntimeUnavailableError("tflite-support's metadata modules are not installed",
                                      hint="make install (tflite-support==0.4.4 is installed with --no-deps)") from e
    return fb, metadata


def _tensor(fb, doc: TensorDoc):
    t = fb.TensorMetadataT()
    t.name, t.description = doc.name, doc.description
    return t


def _file(fb, name: str, description: str):
    f = fb.AssociatedFileT()
    f.name, f.description, f.type = name, description, fb.AssociatedFileType.UNKNOWN
    return f


def write_metadata(model: bytes, doc: ModelDoc) -> bytes:
    """The model with `doc` inside: the metadata flatbuffer (tflite-support's schema) as the
    model's TFLITE_METADATA buffer, and the associated files appended as a zip, as the schema
    packs them (stored, fixed timestamps, sorted names, so the bytes are reproducible).

    tflite-support's MetadataPopulator is not used to insert it: it re-serializes the whole model
    with its own 2022 copy of the TFLite schema, which drops the blockwise quantization details
    ai_edge_quantizer writes (the interpreter then fails: "Blockwise quantization parameters
    ... missing"). The model is re-serialized with ai_edge_litert's current schema instead, its
    tensor names shortened on the way (shorten_tensor_names)."""
    import flatbuffers
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    fb, metadata = _schema()
    meta = fb.ModelMetadataT()
    meta.name, meta.version, meta.description = doc.name, doc.version, doc.description
    meta.author, meta.license = doc.author, doc.license
    subgraph = fb.SubGraphMetadataT()
    subgraph.inputTensorMetadata = [_tensor(fb, t) for t in doc.inputs]
    subgraph.outputTensorMetadata = [_tensor(fb, t) for t in doc.outputs]
    meta.subgraphMetadata = [subgraph]
    files = {name: doc.files[name] for name in sorted(doc.files)}
    files[FACTS_FILE] = json.dumps(doc.facts, indent=2, sort_keys=True).encode("utf-8")
    meta.associatedFiles = [
        _file(fb, name, "edgepack facts: tokenizer ids, chat template, signatures (JSON)" if name == FACTS_FILE
              else "tokenizer file of the source model, byte for byte")
        for name in files
    ]
    builder = flatbuffers.Builder(0)
    builder.Finish(meta.Pack(builder), metadata.MetadataPopulator.METADATA_FILE_IDENTIFIER)

    tflite = flatbuffer_utils.read_model_from_bytearray(memoryview(model))
    for stored in tflite.buffers:
        # ai_edge_quantizer writes large buffers past the flatbuffer, by offset; read back they are
        # byte views, which the object API packs one Python call per byte (minutes for a 135M model).
        # As arrays they pack in one copy, into the same bytes.
        if stored.data is not None and not isinstance(stored.data, np.ndarray):
            stored.data = np.frombuffer(stored.data, dtype=np.uint8)
    for subgraph in tflite.subgraphs:
        shorten_tensor_names(subgraph.tensors)
    graph = tflite.subgraphs[0]
    if (len(graph.inputs), len(graph.outputs)) != (len(doc.inputs), len(doc.outputs)):
        raise ValueError(f"tensor metadata for {len(doc.inputs)} inputs / {len(doc.outputs)} outputs, but subgraph 0 "
                         f"has {len(graph.inputs)} / {len(graph.outputs)}")
    buffer = schema.BufferT()
    buffer.data = bytearray(builder.Output())
    tflite.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = metadata.MetadataPopulator.METADATA_FIELD_NAME, len(tflite.buffers) - 1
    tflite.metadata = [m for m in tflite.metadata or [] if m.name != entry.name.encode()] + [entry]
    out = io.BytesIO(bytes(pack_sharing_quantization(tflite)))
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return out.getvalue()


class _SharedQuantization:
    """A tensor's quantization parameters, packed once for every tensor whose parameters are equal
    (one flatbuffer table, which each tensor references), their vectors once for every table whose
    vector is equal (the zero points of per-channel int8 weights are all zeros, one vector per row
    count). A weight read by the prefill and the decode subgraphs has a tensor in each, and the
    converter writes its per-channel scales and int64 zero points twice: 3.6 MB of the real
    SmolLM2-135M's 89.4 MB file. Flatbuffers allow any number of references to one table or
    vector; what a reader sees is unchanged."""

    def __init__(self, params, memo: dict):
        self.params, self.memo = params, memo

    def Pack(self, builder):  # noqa: N802 (the flatbuffers object API's name)
        key = ("table", _content(self.params))
        if key not in self.memo:
            self.memo[key] = self.params.Pack(_VectorSharingBuilder(builder, self.memo))
        return self.memo[key]


class _VectorSharingBuilder:
    """The builder, but a numpy vector equal to one already written is that one."""

    def __init__(self, builder, memo: dict):
        self._builder, self._memo = builder, memo

    def __getattr__(self, name):
        return getattr(self._builder, name)

    def CreateNumpyVector(self, x):  # noqa: N802
        key = ("vector", x.dtype.str, x.tobytes())
        if key not in self._memo:
            self._memo[key] = self._builder.CreateNumpyVector(x)
        return self._memo[key]


def _content(value):
    """A hashable image of an object API value: arrays by their bytes, tables by their fields."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_content(v) for v in value)
    if hasattr(value, "__dict__"):
        return (type(value).__name__, tuple((k, _content(v)) for k, v in sorted(vars(value).items())))
    return value


def pack_sharing_quantization(tflite) -> bytearray:
    """`tflite` (a ModelT) as flatbuffer bytes, its tensors' quantization parameters packed as
    _SharedQuantization (one memo of offsets for the one builder this packing uses); the ModelT is
    left as it was."""
    from ai_edge_litert.tools import flatbuffer_utils

    memo: dict = {}
    tensors = [t for graph in tflite.subgraphs for t in graph.tensors if t.quantization is not None]
    for tensor in tensors:
        tensor.quantization = _SharedQuantization(tensor.quantization, memo)
    try:
        return flatbuffer_utils.convert_object_to_bytearray(tflite)
    finally:
        for tensor in tensors:
            tensor.quantization = tensor.quantization.params


def _module_path(location: str) -> str:
    """One converter location, `pkg.mod.Class_attr/pkg.mod.Class_attr/...`, as the module path
    `attr.attr...`: the root module (a class with no attribute) goes, or is its class name when
    alone; other text stays."""
    parts, root = [], location
    for scope in location.split("/"):
        owner, _, rest = scope.rpartition(".")
        if not (owner.replace(".", "_").isidentifier() and rest[:1].isupper()):
            parts.append(scope)  # not a class path (`arith.constant`, `3`): kept as it is
        elif "_" in rest:
            parts.append(rest.split("_", 1)[1])
        else:
            root = rest
    return ".".join(parts) or root


def shorten_tensor_names(tensors: list) -> None:
    """Each tensor's name, in place, from litert-torch's scope paths (`edgepack.exporters.decoder.
    ExplicitCacheLM/transformers.models.llama.modeling_llama.LlamaForCausalLM_model/...;3`, up to
    900 bytes, 2.8 MB of the real SmolLM2-135M's 92 MB file) to module paths (`model.model.29.
    self_attn.o_proj;3`). Names are not what anything loads by: the runtimes and the LiteRT-LM
    engine find inputs and outputs through the signatures, whose own names stay. A name that would
    repeat another keeps its long form: names stay unique."""
    taken = {t.name for t in tensors}  # bytes, as the object API reads them
    for tensor in tensors:
        short = ";".join(_module_path(location) for location in tensor.name.decode().split(";")).encode()
        if short != tensor.name and short not in taken:
            taken.discard(tensor.name)
            taken.add(short)
            tensor.name = short


def read_metadata(model: bytes) -> dict:
    """The metadata as the schema's MetadataDisplayer reads it: the metadata JSON, the packed
    files' names and bytes, and the facts JSON parsed."""
    _, metadata = _schema()
    try:
        displayer = metadata.MetadataDisplayer.with_model_buffer(model)
    except ValueError as e:
        raise InputError(f"the .tflite carries no readable metadata: {e}") from e
    names = sorted(displayer.get_packed_associated_file_list())
    files = {name: displayer.get_associated_file_buffer(name) for name in names}
    return {
        "metadata": json.loads(displayer.get_metadata_json()),
        "files": files,
        "facts": json.loads(files[FACTS_FILE]) if FACTS_FILE in files else None,
    }


def describe_file(path: Path) -> list[tuple[str, str]]:
    """describe() of the .tflite at `path` (the registry's metadata reader)."""
    return describe(path.read_bytes())


def describe(model: bytes) -> list[tuple[str, str]]:
    """(label, text) rows for `edgepack inspect`: what the .tflite itself says."""
    read = read_metadata(model)
    meta, facts = read["metadata"], read["facts"] or {}
    rows = [("tflite metadata", f"{meta.get('name')} {meta.get('version')}, author {meta.get('author')}, "
                                f"license {meta.get('license')}")]
    tok = facts.get("tokenizer")
    if tok:
        rows.append(("tflite tokenizer", f"bos {tok.get('bos_id')}, eos {tok.get('eos_ids')}, "
                                         f"chat template {'yes' if tok.get('chat_template') else 'no'}"))
    rows.append(("tflite packed files", ", ".join(f"{n} ({len(b)} B)" for n, b in read["files"].items())))
    return rows
