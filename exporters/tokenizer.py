"""Derive the tokenizer facts an app needs (files, bos, every eos, pad, chat template) from the
model's own files. Nothing here is typed by hand."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from edgepack.errors import InputError
from edgepack.stages import TokenizerFacts

# Shipped byte for byte when present, in this order.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
)
# Any one of these makes a usable tokenizer.
_USABLE = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})", hint="restore the file from the original model") from e


def read_tokenizer(model_dir: Path, config) -> TokenizerFacts:
    files = tuple(name for name in TOKENIZER_FILES if (model_dir / name).is_file())
    if not any(name in files for name in _USABLE):
        raise InputError(
            f"{model_dir}: no tokenizer found (looked for {', '.join(_USABLE)})",
            hint="copy the model's tokenizer files into the directory, or pass --no-tokenizer for a non-text model",
        )
    try:
        tok = _load(str(model_dir))
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise InputError(f"{model_dir}: the tokenizer does not load: {e}",
                         hint="check tokenizer.json / tokenizer_config.json") from e

    generation = _read_json(model_dir / "generation_config.json")
    text_config = config.get_text_config()

    def first(*values):
        return next((v for v in values if v is not None), None)

    bos = first(*_ids(generation.get("bos_token_id"))[:1], getattr(text_config, "bos_token_id", None), tok.bos_token_id)
    pad = first(*_ids(generation.get("pad_token_id"))[:1], getattr(text_config, "pad_token_id", None), tok.pad_token_id)
    eos: list[int] = []
    for source in (generation.get("eos_token_id"), getattr(text_config, "eos_token_id", None), tok.eos_token_id):
        eos += [i for i in _ids(source) if i not in eos]
    probe = tok("a").input_ids
    return TokenizerFacts(
        directory=model_dir,
        files=files,
        bos_id=bos,
        eos_ids=tuple(eos),
        pad_id=pad,
        chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
        add_bos=bool(probe) and bos is not None and probe[0] == bos,
    )


@lru_cache(maxsize=4)
def _load(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)


def encode(facts: TokenizerFacts, text: str) -> list[int]:
    return _load(str(facts.directory))(text).input_ids
