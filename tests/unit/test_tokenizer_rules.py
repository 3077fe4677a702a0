"""The runner tokenizer check and the chat example, on the tiny model's tokenizer (no export)."""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer

from edgepack.exporters.tokenizer import CHAT_EXAMPLE, RUNNER_CHECK_TEXTS, read_tokenizer


def test_runner_tokenizer_agrees_on_the_adversarial_texts(llama_dir):
    facts = read_tokenizer(llama_dir, AutoConfig.from_pretrained(llama_dir), check_runner=True)
    check = facts.runner_check
    assert check["checked"] and check["passed"], check["mismatches"]
    assert check["texts"] == len(RUNNER_CHECK_TEXTS) + 1  # + the model's special tokens written in text
    assert check["runner"].startswith("pytorch_tokenizers ")


def test_chat_example_is_rendered_with_the_models_template(llama_dir):
    facts = read_tokenizer(llama_dir, AutoConfig.from_pretrained(llama_dir), check_runner=False)
    example = facts.chat_example
    tok = AutoTokenizer.from_pretrained(llama_dir)
    expected = tok.apply_chat_template(list(CHAT_EXAMPLE), tokenize=False, add_generation_prompt=True)
    assert example["prompt"] == expected
    assert example["prompt"].count("<|begin_of_text|>") == 1 and example["prompt"].endswith("assistant\n")
    assert example["ids"] == tok(expected, add_special_tokens=False).input_ids
    assert example["ids"][0] == facts.bos_id and example["ids"].count(facts.bos_id) == 1

