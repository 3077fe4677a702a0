"""The model's tokenizer written into the .gguf (tokenizer.ggml.*), so llama.cpp needs nothing
beside the file: a SentencePiece model's pieces and scores, or tokenizer.json's byte-level BPE
vocabulary and merges with the name of the pre-tokenizer llama.cpp must apply (it has its own
table of them, keyed by name, not by regex: exporters/pretokenizers.py); each token's type, the
special ids and the chat template. A tokenizer outside both is refused rather than written with a
guess.

What llama.cpp then makes of the file is checked against the Hugging Face tokenizer by
runtime.check_embedded_tokenizer, on the same texts as the ExecuTorch runner's tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import InputError
from edgepack.exporters.pretokenizers import PRE_TOKENIZERS, llama_cpp_name, splitting_steps
from edgepack.stages import TokenizerFacts


@dataclass(frozen=True)
class GgufVocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    merges: list[str] = field(default_factory=list)  # byte-level BPE's
    scores: list[float] | None = None  # SentencePiece's piece scores, which llama.cpp merges by
    add_space_prefix: bool | None = None  # SentencePiece's dummy "▁" before the text


def read_vocab(tok: TokenizerFacts, rows: int) -> GgufVocab:
    """The model's tokenizer as llama.cpp's vocabulary, padded to the embedding's `rows`: a
    SentencePiece model (tokenizer.model, as Llama 2, Mistral, Phi-3 and Gemma ship it) as its
    "llama" model, a byte-level BPE tokenizer.json as its "gpt2" model. tokenizer.json is needed
    either way: its added tokens are the model's, and it is what the check compares llama.cpp with."""
    path = Path(tok.directory) / "tokenizer.json"
    if "tokenizer.json" not in tok.files:
        raise InputError(f"{tok.directory}: GGUF needs the model's tokenizer.json to write its vocabulary",
                         hint="add tokenizer.json to the model folder, or leave gguf out of --target")
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = llama_cpp_name(spec.get("pre_tokenizer"))
    if "tokenizer.model" in tok.files and pre is None:
        return _sentencepiece_vocab(Path(tok.directory) / "tokenizer.model", spec, rows)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or pre is None:
        raise InputError(
            f"{path}: llama.cpp's vocabulary cannot express this tokenizer (model {model.get('type')}, "
            f"pre-tokenizer {'; '.join(splitting_steps(spec.get('pre_tokenizer')))[:160]})",
            hint="edgepack writes SentencePiece models (tokenizer.model) and byte-level BPE tokenizers with the "
                 f"pre-tokenizers llama.cpp names ({', '.join(PRE_TOKENIZERS)}); leave gguf out of --target")
    import gguf

    pieces = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    tokens, types = _rows(pieces, spec, rows, path)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GgufVocab("gpt2", pre, tokens, types, merges)


def _sentencepiece_vocab(path: Path, spec: dict, rows: int) -> GgufVocab:
    """tokenizer.model's pieces, scores and kinds, as llama.cpp's converter reads them; whether a
    "▁" goes before the text is tokenizer.json's (Metaspace or a Prepend normalizer), which is what
    Hugging Face's tokenizer, and so the check, does."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    kinds = ((sp.IsUnknown, gguf.TokenType.UNKNOWN), (sp.IsControl, gguf.TokenType.CONTROL),
             (sp.IsUnused, gguf.TokenType.UNUSED), (sp.IsByte, gguf.TokenType.BYTE))
    pieces = {i: (sp.IdToPiece(i), next((kind for test, kind in kinds if test(i)), gguf.TokenType.NORMAL))
              for i in range(sp.GetPieceSize())}
    tokens, types = _rows(pieces, spec, rows, path)
    # an added token past the model's pieces (or replacing one) scores as llama.cpp's converter scores it
    scores = [sp.GetScore(i) if i < sp.GetPieceSize() and tokens[i] == sp.IdToPiece(i) else -1000.0 for i in range(rows)]
    described = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
    prefix = '"prepend_scheme": "first"' in described or '"prepend_scheme": "always"' in described \
        or '"type": "Prepend"' in described
    return GgufVocab("llama", "default", tokens, types, scores=scores, add_space_prefix=prefix)


def _rows(pieces: dict[int, tuple[str, int]], spec: dict, rows: int, path: Path) -> tuple[list[str], list[int]]:
    """Every embedding row's token and type: the model's pieces, its added tokens over them (control
    when special), and the rows no token maps to named as llama.cpp's converter names them."""
    import gguf

    pieces = dict(pieces)
    for t in spec.get("added_tokens", []):
        pieces[t["id"]] = (t["content"], gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    if max(pieces) >= rows:
        raise InputError(f"{path}: token id {max(pieces)} does not fit the model's {rows} embedding rows")
    filled = [pieces.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(rows)]
    return [t for t, _ in filled], [int(k) for _, k in filled]


def write_vocab(writer, vocab: GgufVocab, tok: TokenizerFacts) -> None:
    """The vocabulary, special ids and chat template as llama.cpp reads them. llama.cpp keeps one
    eos id; a model with more (e.g. <|im_end|> beside <|endoftext|>) writes the next as its
    end-of-turn id, and the runtime check confirms llama.cpp stops on every one."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
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
