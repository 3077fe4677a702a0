"""llama.cpp's pre-tokenizer names and tokenizer.json's splits, both ways: the table reads back to
its own names, and a .gguf source's tokenizer gets the split its file names (or is refused), on
small GGUF files written with the gguf package (no model, no export)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from edgepack.errors import InputError
from edgepack.exporters.gguf_source import _mend_tokenizer
from edgepack.exporters.pretokenizers import PRE_TOKENIZERS, llama_cpp_name

GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def test_every_name_reads_back_to_itself():
    assert {name: llama_cpp_name(spec) for name, spec in PRE_TOKENIZERS.items()} == {n: n for n in PRE_TOKENIZERS}
    assert llama_cpp_name({"type": "Whitespace"}) is None


def _gguf_with(path, model: str, pre: str | None, tokens: int = 4):
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list([f"t{i}" for i in range(tokens)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _converted(path):
    """tokenizer.json as transformers writes it from a .gguf: GPT-2's split, and an <|endoftext|>
    past the file's last token."""
    spec = {"pre_tokenizer": GPT2_SPLIT, "added_tokens": [{"id": 2, "content": "<s>"}, {"id": 4, "content": "<|endoftext|>"}]}
    path.write_text(json.dumps(spec))
    return path


def test_a_named_split_replaces_gpt2s_and_extra_tokens_go(tmp_path):
    tokenizer = _converted(tmp_path / "tokenizer.json")
    _mend_tokenizer(_gguf_with(tmp_path / "m.gguf", "gpt2", "smollm"), tokenizer)
    spec = json.loads(tokenizer.read_text())
    assert spec["pre_tokenizer"] == PRE_TOKENIZERS["smollm"]
    assert [t["id"] for t in spec["added_tokens"]] == [2]


def test_smollms_split_differs_from_gpt2s_where_digits_are():
    """Why it matters: GPT-2's rule parts the two newlines before a digit and keeps a number whole;
    SmolLM2's keeps the newlines one piece and puts every digit apart (so "\n\n1." is one token
    fewer with it, as the model was trained)."""
    text = "Steps:\n\n1. Water 2024"
    for name, want in (("gpt-2", ["Steps", ":", "Ċ", "Ċ", "1", ".", "ĠWater", "Ġ2024"]),
                       ("smollm", ["Steps", ":", "ĊĊ", "1", ".", "ĠWater", "Ġ", "2", "0", "2", "4"])):
        tok = Tokenizer.from_str(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []},
                                             "pre_tokenizer": PRE_TOKENIZERS[name]}))
        assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)] == want, name


@pytest.mark.parametrize("pre, message", [("tekken", None), (None, "names no pre-tokenizer"),
                                          ("made-up", "'made-up' is not one edgepack can reproduce")])
def test_a_split_edgepack_cannot_reproduce_is_refused(tmp_path, pre, message):
    tokenizer = _converted(tmp_path / "tokenizer.json")
    path = _gguf_with(tmp_path / "m.gguf", "gpt2", pre)
    if message is None:  # a name transformers' loader gives its own split: kept as transformers wrote it
        _mend_tokenizer(path, tokenizer)
        assert json.loads(tokenizer.read_text())["pre_tokenizer"] == GPT2_SPLIT
        return
    with pytest.raises(InputError, match=message) as refused:
        _mend_tokenizer(path, tokenizer)
    assert "Hugging Face folder" in refused.value.hint


def test_a_sentencepiece_vocabulary_has_no_split_to_mend(tmp_path):
    tokenizer = _converted(tmp_path / "tokenizer.json")
    _mend_tokenizer(_gguf_with(tmp_path / "m.gguf", "llama", None), tokenizer)
    assert json.loads(tokenizer.read_text())["pre_tokenizer"] == GPT2_SPLIT
