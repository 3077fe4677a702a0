"""The LiteRT-LM bundle (`.litertlm`) for apps on the LiteRT-LM runtime: the prefill/decode
.tflite, the tokenizer and the LLM metadata (start and stop tokens, context length, the chat
template) in one file, written with Google's litert-lm-builder and read back with its peek tool."""

from __future__ import annotations

import contextlib
import io
import tempfile
import uuid
from pathlib import Path

from edgepack.errors import InputError
from edgepack.packaging.bundle import sha256_bytes

# The builder stamps a random uuid and the current time into every file; fixed values keep the
# bytes reproducible (the uuid is derived from the content, the time is the zip epoch we use too).
_EPOCH = "1980-01-01T00:00:00+00:00"


def build_litertlm(model: bytes, tokenizer_dir: Path, tokenizer_files: tuple[str, ...], *,
                   bos_id: int | None, eos_ids: tuple[int, ...], max_seq_len: int,
                   chat_template: str | None, name: str) -> bytes:
    from litert_lm_builder import litertlm_builder as lb
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    if "tokenizer.json" in tokenizer_files:
        tokenizer, add_tokenizer = tokenizer_dir / "tokenizer.json", "add_hf_tokenizer"
    elif "tokenizer.model" in tokenizer_files:
        tokenizer, add_tokenizer = tokenizer_dir / "tokenizer.model", "add_sentencepiece_tokenizer"
    else:
        raise InputError("--tflite-bundle litertlm needs tokenizer.json or tokenizer.model",
                         hint="LiteRT-LM reads Hugging Face or SentencePiece tokenizers only")
    meta = llm_metadata_pb2.LlmMetadata(max_num_tokens=max_seq_len)
    if bos_id is not None:
        meta.start_token.token_ids.ids.append(bos_id)
    for eos in eos_ids:
        meta.stop_tokens.add().token_ids.ids.append(eos)
    if chat_template:
        meta.jinja_prompt_template = chat_template
    content_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"edgepack:{name}:{sha256_bytes(model)}"))

    def fixed_system_metadata(entries):
        kept = [m for m in entries if m.key not in ("uuid", "creation_timestamp")]
        return kept + [lb.Metadata(key="uuid", value=content_id, dtype=lb.DType.STRING),
                       lb.Metadata(key="creation_timestamp", value=_EPOCH, dtype=lb.DType.STRING)]

    with tempfile.TemporaryDirectory() as tmp:
        model_path, meta_path = Path(tmp) / "model.tflite", Path(tmp) / "llm_metadata.pb"
        model_path.write_bytes(model)
        meta_path.write_bytes(meta.SerializeToString())
        builder = lb.LitertLmFileBuilder()
        builder.add_system_metadata(lb.Metadata(key="Authors", value="edgepack", dtype=lb.DType.STRING))
        builder.add_llm_metadata(str(meta_path))
        builder.add_tflite_model(str(model_path), lb.TfLiteModelType.PREFILL_DECODE)
        getattr(builder, add_tokenizer)(str(tokenizer))
        stream = io.BytesIO()
        original = lb.populate_system_metadata
        lb.populate_system_metadata = fixed_system_metadata
        try:
            builder.build(stream)
        finally:
            lb.populate_system_metadata = original
    return stream.getvalue()


def read_litertlm(data: bytes) -> dict[str, str | bytes]:
    """Every section of a .litertlm as the builder's own peek tool dumps it (file name -> bytes),
    plus its printed report under "report"."""
    from litert_lm_builder import litertlm_peek

    with tempfile.TemporaryDirectory() as tmp:
        path, dump = Path(tmp) / "model.litertlm", Path(tmp) / "dump"
        path.write_bytes(data)
        report = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()):
            litertlm_peek.peek_litertlm_file(str(path), str(dump), report)
        files: dict[str, str | bytes] = {p.name: p.read_bytes() for p in dump.rglob("*") if p.is_file()}
    files["report"] = report.getvalue()
    return files
