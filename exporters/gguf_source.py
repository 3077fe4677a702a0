"""Front end for GGUF files (llama.cpp's format, how small LMs are often shipped): transformers
reads the file (tensors dequantized to fp32, the tokenizer and chat template from its metadata),
the model is rebuilt as the plain transformers architecture its config names, and written as an
ordinary Hugging Face directory (config.json, model.safetensors, tokenizer files), which the rest
of the front end then loads like any other.

Needs the `gguf` and `accelerate` packages (pip install 'edgepack[gguf]')."""

from __future__ import annotations

from pathlib import Path

from edgepack.errors import InputError


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
    return out_dir
