"""The model's tokenizer written into the .gguf (tokenizer.ggml.*), so llama.cpp needs nothing
beside the file: the byte-level BPE vocabulary and merges of tokenizer.json, each token's type,
the special ids and the chat template, and the name of the pre-tokenizer llama.cpp must apply
(it has its own table of them, keyed by name, not by regex: exporters/pretokenizers.py). A
tokenizer outside that table is refused rather than written with a guess.

What llama.cpp then makes of the file is checked against the Hugging Face tokenizer by
runtime.check_embedded_tokenizer, on the same texts as the ExecuTorch runner's tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import InputError
from edgepack.exporters.pretokenizers import PRE_TOKENIZERS, llama_cpp_name, splitting_steps
from edgepack.stages import TokenizerFacts


@dataclass(frozen=True)
class GgufVocab:
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    merges: list[str]


def read_vocab(tok: TokenizerFacts, rows: int) -> GgufVocab:
    """tokenizer.json as GGUF's gpt2-model vocabulary, padded to the embedding's `rows`."""
    import gguf

    path = Path(tok.directory) / "tokenizer.json"
    if "tokenizer.json" not in tok.files:
        raise InputError(f"{tok.directory}: GGUF needs the model's tokenizer.json to write its vocabulary",
                         hint="add tokenizer.json to the model folder, or leave gguf out of --target")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    pre = llama_cpp_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise InputError(
            f"{path}: llama.cpp's vocabulary cannot express this tokenizer (model {model.get('type')}, "
            f"pre-tokenizer {'; '.join(splitting_steps(spec.get('pre_tokenizer')))[:160]})",
            hint="edgepack writes byte-level BPE tokenizers with the pre-tokenizers llama.cpp names "
                 f"({', '.join(PRE_TOKENIZERS)}); leave gguf out of --target")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()}
    for i, t in added.items():
        by_id[i] = t["content"]
    if max(by_id) >= rows:
        raise InputError(f"{path}: token id {max(by_id)} does not fit the model's {rows} embedding rows")
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:  # rows the tokenizer never produces: named as llama.cpp's converter does
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GgufVocab("gpt2", pre, tokens, [int(t) for t in types], merges)


def write_vocab(writer, vocab: GgufVocab, tok: TokenizerFacts) -> None:
    """The vocabulary, special ids and chat template as llama.cpp reads them. llama.cpp keeps one
    eos id; a model with more (e.g. <|im_end|> beside <|endoftext|>) writes the next as its
    end-of-turn id, and the runtime check confirms llama.cpp stops on every one."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_ids:
        writer.add_eos_token_id(tok.eos_ids[0])
    if len(tok.eos_ids) > 1:
        writer.add_eot_token_id(tok.eos_ids[1])
    if tok.pad_id is not None:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
