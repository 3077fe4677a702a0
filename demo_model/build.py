"""Tiny, deterministic demo models for tests and examples (no network needed).

Builds random-weight Llama and BERT models plus tokenizers trained on a small
bundled corpus, and writes them as ordinary Hugging Face model directories.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS_PATH = Path(__file__).parent / "corpus.txt"

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Llama-3-like, but only uses tokens our vocab actually has: role header on its
# own line, content, then <|eot_id|> (the chat stop token).
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant\n{% endif %}"
)


def _corpus_lines() -> list[str]:
    """Corpus paragraphs; non-empty lines keep the trainer input stable."""
    text = CORPUS_PATH.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE tokenizer (Llama-3 style specials, ids 0-3)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA_SPECIALS,  # list order fixes their ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    bos = LLAMA_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A $B:1",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    return tok


def _train_wordpiece(vocab_size: int = 500) -> Tokenizer:
    """Train a lowercase BERT-style WordPiece tokenizer ([PAD]=0 ... [MASK]=4)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    lines = _corpus_lines()
    # The trainer gives "##x" pieces ids in hash-map order, so merge tie-breaks
    # (and the vocab) vary per process. Pinning them as extra specials, in
    # sorted order, makes training deterministic; they become plain vocab below.
    inner: set[str] = set()
    for line in lines:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line)):
            inner.update(word[1:])
    pinned = [f"##{c}" for c in sorted(inner)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=BERT_SPECIALS + pinned, show_progress=False
    )
    tok.train_from_iterator(lines, trainer=trainer)

    # Rebuild from the trained vocab so only the real specials are special.
    out = Tokenizer(models.WordPiece(vocab=tok.get_vocab(), unk_token="[UNK]"))
    out.normalizer = tok.normalizer
    out.pre_tokenizer = tok.pre_tokenizer
    out.decoder = decoders.WordPiece()
    out.add_special_tokens(BERT_SPECIALS)
    cls_id, sep_id = out.token_to_id("[CLS]"), out.token_to_id("[SEP]")
    out.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return out


def fit_to_corpus(model, tok: Tokenizer, steps: int, seed: int, seq_len: int = 64, batch: int = 16) -> None:
    """A few steps of next-token training on the demo corpus (run single-threaded by
    fit_until_decisive, so the weights and the saved bytes are the same on every machine)."""
    import torch

    ids = torch.tensor(tok.encode("\n".join(_corpus_lines())).ids, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=window, labels=window).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# Per family: the transformers config class and what differs from the shared tiny shape. Sliding
# windows are shorter than the golden prompt plus its 16 steps, so the window logic is exercised.
# Llama 3.x's rope (each frequency scaled by its own factor), with an original context short enough
# that a tiny model's positions reach the scaled and the smoothed frequencies.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# Phi-3.5's LongRoPE at the tiny models' scale: 8 frequencies (head_dim 16), 256 original positions
# of 512, cos/sin scaled by sqrt(1 + ln 16 / ln 256) (Phi-3.5's by 1.19). Exports within 256
# positions (the context llama.cpp rounds theirs up to) use the short factors.
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256, "factor": 16.0,
                 "short_factor": [1.0, 1.2, 1.6, 2.2, 3.0, 4.5, 6.0, 8.0],
                 "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0]}
DECODER_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama3": ("LlamaConfig", {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE}),
    # dynamic NTK (InternLM2's, some long-context fine-tunes'): the plain rope within the positions
    "llama_dynamic": ("LlamaConfig", {"tie_word_embeddings": True,
                                      "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "phi3_longrope": ("Phi3Config", {"tie_word_embeddings": False, "rope_parameters": PHI3_LONGROPE}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "gpt2": ("GPT2Config", {"num_key_value_heads": None}),  # None: the config has no such field
}


# Top-2 logit margin every golden greedy step must have in fp32 before a test model is saved: well
# above the ~0.1-0.2 by which the backends' kernels move logits from their quantized eager reference.
DECISIVE_MARGIN = 0.3


def golden_greedy_margin(model, tok: Tokenizer) -> float:
    """The smallest top-2 logit margin over the smoke test's greedy steps (full forward, fp32)."""
    import torch

    from edgepack.exporters.capture import GOLDEN_PROMPT, GOLDEN_STEPS

    ids = torch.tensor([tok.encode(GOLDEN_PROMPT).ids])
    margins = []
    model.eval()
    with torch.no_grad():
        for _ in range(GOLDEN_STEPS):
            top2 = model(input_ids=ids).logits[0, -1].topk(2)
            margins.append(float(top2.values[0] - top2.values[1]))
            ids = torch.cat([ids, top2.indices[:1].unsqueeze(0)], 1)
    return min(margins)


def quantized_copies(model) -> list:
    """The int4 copies whose greedy choices must be decisive too: quantization itself moves the
    logits, and the smoke test compares each artifact with its backend's quantized reference. A
    weight-only copy with min/max scales (CoreML, TFLite, ONNX store those), and ExecuTorch's own
    (searched scales, int8 dynamic activations) when it is installed."""
    import copy

    from edgepack.exporters.weights import Rounding, weight_only_reference
    from edgepack.quant import QuantSpec

    int4 = QuantSpec.from_options("int4")
    copies = [weight_only_reference(model, int4, lambda bits: Rounding.symmetric(bits, narrow=False))]
    try:
        from edgepack.exporters.executorch.lower import quantize_module
    except ImportError:
        return copies
    return copies + [quantize_module(copy.deepcopy(model), int4)]


def fit_until_decisive(model, tok: Tokenizer, seed: int, max_steps: int, chunk: int = 100) -> int:
    """Fit in chunks of `chunk` steps until golden_greedy_margin >= DECISIVE_MARGIN (or max_steps),
    in fp32 and in each of quantized_copies."""
    import torch

    steps, threads = 0, torch.get_num_threads()
    torch.set_num_threads(1)  # sums in one order: the same stopping step and weights on every machine
    try:
        while steps < max_steps:
            fit_to_corpus(model, tok, chunk, seed + steps)
            steps += chunk
            models = [model, *quantized_copies(model)]
            if min(golden_greedy_margin(m, tok) for m in models) >= DECISIVE_MARGIN:
                break
    finally:
        torch.set_num_threads(threads)
    return steps


def decoder_config(family: str = "llama", *, hidden_size: int = 64, intermediate_size: int = 128,
                   num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                   max_position_embeddings: int = 512, vocab_size: int = 512, rope_parameters: dict | None = None):
    """The transformers config of a tiny `family` model (a DECODER_CONFIGS key), with the demo
    tokenizer's special ids; `rope_parameters` in place of the family's default rope."""
    import transformers

    config_class, overrides = DECODER_CONFIGS[family]
    fields = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                  num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                  rope_parameters=rope_parameters, **SPECIAL_IDS)
    fields.update(overrides)
    config = getattr(transformers, config_class)
    if "original_max_position_embeddings" in inspect.signature(config).parameters:  # Phi-3's own field wins over the rope's
        fields["original_max_position_embeddings"] = (fields["rope_parameters"] or {}).get("original_max_position_embeddings")
    return config(**{k: v for k, v in fields.items() if v is not None})


SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": 3}


def build_decoder_dir(out_dir: str | Path, family: str = "llama", *, vocab_size: int = 512, seed: int = 0,
                      max_train_steps: int = 1200, **shape) -> Path:
    """Write a tiny causal LM of `family` (a DECODER_CONFIGS key) + tokenizer as an HF model dir.

    The weights are fitted to the demo corpus until greedy decoding of the golden prompt is
    decisive (see fit_until_decisive): an untrained model's next-token logits are near-ties, so
    greedy decoding flips on the tiniest numerical difference and a token-for-token smoke test
    would only measure noise.
    """
    import torch
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    tok = train_tokenizer(vocab_size)
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = decoder_config(family, vocab_size=vocab_size, **shape)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    fit_until_decisive(model, tok, seed, max_train_steps)
    model.eval().save_pretrained(out, safe_serialization=True)
    GenerationConfig(**SPECIAL_IDS).save_pretrained(out)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        model_max_length=config.max_position_embeddings,
    )
    hf_tok.chat_template = LLAMA_CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    return out


def build_llama_dir(out_dir: str | Path, **shape) -> Path:
    """The tiny Llama of the demo and most tests."""
    return build_decoder_dir(out_dir, "llama", **shape)


def build_bert_dir(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a random tiny BertModel + WordPiece tokenizer as an HF model dir."""
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = _train_wordpiece()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    hf_tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m demo_model.build OUT_DIR [--family NAME]``."""
    parser = argparse.ArgumentParser(prog="python -m demo_model.build", description=__doc__)
    parser.add_argument("out_dir", help="directory to write the model into")
    parser.add_argument("--family", default="llama", choices=[*DECODER_CONFIGS, "bert"],
                        help="the architecture to build (default: llama)")
    args = parser.parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    if args.family == "bert":
        print(build_bert_dir(args.out_dir))
    else:
        print(build_decoder_dir(args.out_dir, args.family))


if __name__ == "__main__":
    main()
