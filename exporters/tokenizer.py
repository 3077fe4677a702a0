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

# Text that tokenizer implementations disagree on: multi-byte scripts, emoji (incl. ZWJ sequences
# and skin tones), combining marks, byte-fallback material (control and private-use characters),
# runs of whitespace and newlines, a very long word, digits, code. The model's own special tokens
# are added in text at check time.
RUNNER_CHECK_TEXTS = (
    "The river ran past the old mill, and the children",
    "駅はどこですか。東京の天気は晴れです。",
    "번역기는 문장을 잘 처리합니까? 中文标点：你好，世界！",
    "👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇫🇷 flag, 🙂🙂🙂",
    "naïve café — e\u0301 (combining acute), Ångström, ß, ﬁ ligature",
    "control\x01chars\x7f and private use \ue000\uf8ff",
    "   leading spaces, \t\ttabs,\n\n\nnewlines\r\n and trailing   ",
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "1234567890 3.14159 -42 1e-7 0x1F\n\n1. first  2. second",  # whitespace before a digit: where digit rules part
    "def f(x):\n    return {'a': [x, x**2]}  # code",
    "",
)
# The conversation rendered with the chat template at export: apps check their own rendering against it.
CHAT_EXAMPLE = (
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
)


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


def read_tokenizer(model_dir: Path, config, *, check_runner: bool, model_rows: int | None = None) -> TokenizerFacts:
    """check_runner: compare with the on-device LLM runner's tokenizer (causal LMs only).
    model_rows: the model's embedding rows; every id the tokenizer can produce must fit them."""
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
    chat_template = tok.chat_template if isinstance(tok.chat_template, str) else None
    chat_example = render_chat_example(tok) if chat_template else None
    warnings = () if model_rows is None else check_vocabulary(
        tok, model_rows, {"bos": [bos], "eos": eos, "pad": [pad],
                          "the chat template's example": chat_example["ids"] if chat_example else []}, model_dir)
    return TokenizerFacts(
        directory=model_dir,
        files=files,
        bos_id=bos,
        eos_ids=tuple(eos),
        pad_id=pad,
        chat_template=chat_template,
        add_bos=bool(probe) and bos is not None and probe[0] == bos,
        runner_check=check_runner_tokenizer(model_dir, [bos, *eos, pad]) if check_runner else {},
        chat_example=chat_example,
        warnings=warnings,
    )


def check_vocabulary(tok, rows: int, used: dict[str, list], model_dir: Path) -> tuple[str, ...]:
    """Every id the tokenizer can produce must index the model's embedding (rows), or a phone
    reads past the table. An ordinary token beyond it, or a special token the model is asked to
    use (bos, eos, pad, the chat template's), is an error. A special token nobody uses is a
    warning only: text never produces it unless it spells the token out."""
    beyond = sorted(i for i in tok.get_vocab().values() if i >= rows)
    if not beyond:
        return ()
    special = {i for i, added in tok.added_tokens_decoder.items() if added.special}
    wanted = {f"{what} id {i}" for what, ids in used.items() for i in ids if i is not None and i >= rows}
    ordinary = [i for i in beyond if i not in special]
    if wanted or ordinary:
        found = sorted(wanted) + ([f"{len(ordinary)} ordinary token(s) from id {ordinary[0]}"] if ordinary else [])
        raise InputError(f"{model_dir}: the tokenizer produces ids the model's {rows}-row embedding does not have: "
                         f"{', '.join(found)} (largest id {beyond[-1]})",
                         hint="the tokenizer files and the weights must come from the same model")
    names = [tok.convert_ids_to_tokens(i) for i in beyond]
    return (f"the tokenizer has {len(beyond)} special token(s) beyond the model's {rows}-row embedding "
            f"({', '.join(map(str, names[:4]))}{' ...' if len(names) > 4 else ''}); they are not bos, eos, pad or "
            f"in the chat template, but text that spells them out would index past the table on a device",)


def runner_check_texts(reference, special_ids) -> tuple[str, ...]:
    """RUNNER_CHECK_TEXTS and a text that spells out the model's special tokens (`reference`: the
    HF `tokenizers` Tokenizer), what every on-device tokenizer is compared on."""
    specials = " ".join(reference.id_to_token(i) or "" for i in special_ids if i is not None)
    return (*RUNNER_CHECK_TEXTS, f"{specials} special tokens {specials} in text")


def ids_mismatch(text: str, got: list[int], want: list[int]) -> dict:
    """A runner's ids that differ from the reference's on `text`: where, and 8 ids from there."""
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return {"text": text, "what": "ids", "at": first, "runner": got[first:first + 8], "reference": want[first:first + 8]}


def check_runner_tokenizer(model_dir: Path, special_ids: list[int | None]) -> dict:
    """Encode RUNNER_CHECK_TEXTS (plus the model's special tokens written in text) with the HF
    `tokenizers` library and with the C++ tokenizer ExecuTorch's LLM runner links on Android and
    iOS (pytorch_tokenizers), and compare ids and the round-trip decode."""
    path = model_dir / "tokenizer.json"
    result: dict = {"reference": "tokenizers (Hugging Face)", "file": "tokenizer/tokenizer.json"}
    if not path.is_file():
        return {**result, "checked": False, "reason": "no tokenizer.json (the runner's SentencePiece/tiktoken paths are not checked)"}
    try:
        import pytorch_tokenizers
    except ImportError:
        return {**result, "checked": False, "reason": "pytorch_tokenizers is not installed (pip install pytorch-tokenizers; its pin is in pyproject.toml)"}
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(path))
    runner_name = f"pytorch_tokenizers {pytorch_tokenizers.__version__} HFTokenizer"
    runner = pytorch_tokenizers.CppHFTokenizer()
    try:
        runner.load(str(path))
    except Exception as e:  # e.g. a normalizer the runner does not implement (Lowercase, NFKC)
        # The runner logs its reason and raises a generic error: name the parts it had to read.
        parts = {k: (v or {}).get("type") for k, v in _read_json(path).items()
                 if k in ("normalizer", "pre_tokenizer", "model", "decoder")}
        return {**result, "checked": True, "runner": runner_name, "texts": 0, "passed": False,
                "mismatches": [{"text": "", "what": "load", "error": f"{e} (tokenizer.json parts: "
                                + ", ".join(f"{k} {v}" for k, v in parts.items()) + ")"}]}
    texts = runner_check_texts(reference, special_ids)
    mismatches = []
    for text in texts:
        want = reference.encode(text, add_special_tokens=False).ids
        got = list(runner.encode(text, 0, 0))
        if got != want:
            mismatches.append(ids_mismatch(text, got, want))
        elif runner.decode_batch(got) != reference.decode(want, skip_special_tokens=False):
            mismatches.append({"text": text, "what": "decode", "runner": runner.decode_batch(got),
                               "reference": reference.decode(want, skip_special_tokens=False)})
    return {**result, "checked": True, "runner": runner_name, "texts": len(texts), "passed": not mismatches,
            "mismatches": mismatches}


def render_chat_example(tok) -> dict:
    prompt = tok.apply_chat_template(list(CHAT_EXAMPLE), tokenize=False, add_generation_prompt=True)
    # The template writes its own BOS (if any): the rendered text is tokenized without adding one.
    return {"messages": list(CHAT_EXAMPLE), "add_generation_prompt": True, "prompt": prompt,
            "ids": tok(prompt, add_special_tokens=False).input_ids}


@lru_cache(maxsize=4)
def _load(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)


def encode(facts: TokenizerFacts, text: str) -> list[int]:
    return _load(str(facts.directory))(text).input_ids
