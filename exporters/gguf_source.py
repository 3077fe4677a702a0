"""Front end for GGUF files (llama.cpp's format, how small LMs are often shipped): transformers
reads the file (tensors dequantized to fp32, the tokenizer and chat template from its metadata),
the model is rebuilt as the plain transformers architecture its config names, and written as an
ordinary Hugging Face directory (config.json, model.safetensors, tokenizer files), which the rest
of the front end then loads like any other.

Needs the `gguf` and `accelerate` packages (pip install 'edgepack[gguf]')."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edgepack.errors import InputError


def stored_types(path: Path) -> dict:
    """How the file stores its weights, for the manifest: its file type (llama.cpp's name for the
    quantization it was made with) and, per GGUF tensor type, how many tensors and parameters. A
    source already on a 4-bit grid (Q4_1, blocks of 32 with a minimum) is rounded again by every
    backend whose grid differs; this is the record of what it was."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors: Counter[str] = Counter()
    parameters: Counter[str] = Counter()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        tensors[kind] += 1
        parameters[kind] += int(tensor.n_elements)
    field = reader.get_field(gguf.Keys.General.FILE_TYPE)
    file_type = None if field is None else int(field.contents())
    if file_type is not None:
        try:
            file_type = gguf.LlamaFileType(file_type).name
        except ValueError:  # a type newer than this gguf package: keep its number
            file_type = str(file_type)
    return {"format": "gguf", "file_type": file_type,
            "tensor_types": {kind: {"tensors": tensors[kind], "parameters": parameters[kind]} for kind in sorted(tensors)}}


def convert_gguf(path: Path, out_dir: Path) -> Path:
    """Write the model in `path` (a .gguf file) as a Hugging Face directory `out_dir`."""
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs it)
        import gguf  # noqa: F401
        import torch
        import transformers
    except ImportError as e:
        raise InputError(f"{path}: reading GGUF files needs the gguf and accelerate packages ({e})",
                         hint="pip install 'edgepack[gguf]'") from e
    if not path.is_file():
        raise InputError(f"{path}: no such file", hint="pass the path of a .gguf file")
    transformers.utils.logging.disable_progress_bar()
    where, name = str(path.parent), path.name
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32,
                                                                   local_files_only=True, trust_remote_code=False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True,
                                                               trust_remote_code=False)
    except Exception as e:  # transformers raises many types for files it cannot read
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: transformers cannot read this GGUF file: {text[:300]}",
                         hint="edgepack reads the GGUF architectures transformers supports (llama, qwen2, gemma2/3, "
                              "phi3, mistral, gpt2, ...)") from e
    # The loaded model carries a GGUF quantization config; the plain architecture does not, and
    # holds the same (already dequantized) weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise InputError(f"{path}: the GGUF tensors do not fill the {type(loaded).__name__} they describe "
                         f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _drop_tokens_the_file_lacks(out_dir / "tokenizer.json", _token_count(path))
    return out_dir


def _token_count(path: Path) -> int:
    import gguf

    return len(gguf.GGUFReader(path).get_field(gguf.Keys.Tokenizer.LIST).data)


def _drop_tokens_the_file_lacks(tokenizer_json: Path, n_tokens: int) -> None:
    """transformers' GGUF loader builds a GPT-2 style tokenizer whose defaults add "<|endoftext|>"
    when the file's vocabulary has no such token, as a new id past the file's last one (and past
    the embedding rows). Nothing in the file refers to it: it goes."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    kept = [t for t in spec.get("added_tokens", []) if t["id"] < n_tokens]
    if len(kept) != len(spec.get("added_tokens", [])):
        spec["added_tokens"] = kept
        tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
