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
from edgepack.exporters.pretokenizers import PRE_TOKENIZERS


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
    _mend_tokenizer(path, out_dir / "tokenizer.json")
    return out_dir


def _mend_tokenizer(path: Path, tokenizer_json: Path) -> None:
    """Two things transformers' GGUF loader gets wrong for some files, set right from the file:

    - its GPT-2 style tokenizer adds "<|endoftext|>" when the file's vocabulary has none, as a new
      id past the file's last one (and past the embedding rows). Nothing in the file refers to it:
      it goes.
    - it splits text by GPT-2's rule for every pre-tokenizer name it does not know (SmolLM2's
      "smollm" among them), so the tokenizer would not give the ids the model was trained on. The
      names edgepack knows get their own split; a name neither knows is refused."""
    import gguf

    reader = gguf.GGUFReader(path)
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    n_tokens = len(reader.get_field(gguf.Keys.Tokenizer.LIST).data)
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < n_tokens]
    if _field(reader, gguf.Keys.Tokenizer.MODEL) == "gpt2":  # byte-level BPE: the only kind with a named split
        spec["pre_tokenizer"] = _pre_tokenizer(path, _field(reader, gguf.Keys.Tokenizer.PRE), spec.get("pre_tokenizer"))
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")


def _pre_tokenizer(path: Path, name: str | None, converted: dict) -> dict:
    """tokenizer.json's pre_tokenizer for llama.cpp's pre-tokenizer `name`."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if name in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[name]
    if name in GGUF_PRE_TOKENIZER_SPLITS:  # transformers wrote this name's own split
        return converted
    known = sorted({*PRE_TOKENIZERS, *GGUF_PRE_TOKENIZER_SPLITS})
    if name is None:
        raise InputError(f"{path}: the file names no pre-tokenizer (tokenizer.ggml.pre), so how its text splits "
                         f"into tokens is unknown (llama.cpp itself warns such files tokenize wrongly)",
                         hint="remake the .gguf with a current llama.cpp convert_hf_to_gguf.py, or export from "
                              "the model's Hugging Face folder")
    raise InputError(f"{path}: the file's pre-tokenizer {name!r} is not one edgepack can reproduce, so the bundled "
                     f"tokenizer would not give the ids the model was trained on",
                     hint=f"known: {', '.join(known)}; export from the model's Hugging Face folder instead")


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()
