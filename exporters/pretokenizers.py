"""llama.cpp's pre-tokenizers (the rule that decides where a byte-level BPE tokenizer may split
text, which llama.cpp keys by name, `tokenizer.ggml.pre`) as tokenizer.json writes them. One
table read both ways: the .gguf front end gives a tokenizer converted from a file the split its
name stands for, and the .gguf backend names the split a tokenizer.json uses.

Why the front end needs it: transformers' GGUF loader knows some names (qwen2, llama-bpe, ...)
and falls back to GPT-2's split for the rest, so SmolLM2's "smollm" (digits one by one) came out
as GPT-2's, and "2024" tokenized differently from the model's own tokenizer."""

from __future__ import annotations

import json

_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        _byte_level(False)]}


# llama.cpp's name -> tokenizer.json's pre_tokenizer. One row per splitting rule llama.cpp
# implements that edgepack has checked against llama.cpp's own tokenization.
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt-2": _byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)]},
    "qwen2": _split_then_bytes(_QWEN2_REGEX),
    "llama-bpe": _split_then_bytes(_LLAMA3_REGEX),
}


def splitting_steps(pre: dict | None) -> tuple[str, ...]:
    """A tokenizer.json pre_tokenizer as the steps that decide where tokens may split
    (trim_offsets only moves offsets, never ids: not compared)."""
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    out = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            out.append("byte-level, GPT-2 regex" if step.get("use_regex", True) else "byte-level")
        elif kind == "Digits" and step.get("individual_digits"):
            out.append("digits one by one")
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            out.append(f"split {step.get('pattern', {}).get('Regex')}")
        else:
            out.append(f"{kind} {json.dumps(step, sort_keys=True)[:80]}")
    return tuple(out)


def llama_cpp_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre_tokenizer, or None when it has none in the table."""
    steps = splitting_steps(pre)
    return next((name for name, spec in PRE_TOKENIZERS.items() if splitting_steps(spec) == steps), None)
