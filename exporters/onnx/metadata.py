"""What travels with the .onnx: the model's metadata_props (read by any ONNX Runtime app through
`session.get_modelmeta().custom_metadata_map`) and, for decoder LMs, the genai_config.json that
onnxruntime-genai reads to drive the model (its `model.decoder` I/O names, head layout, stop tokens,
context length, and search defaults: greedy).

KV cache convention: exporters/onnx_capture.py. genai runs it with `past_present_share_buffer:
true`, as its own builder's models: the past is one buffer of the whole context per layer and
GroupQueryAttention writes each call's keys and values into it in place, taking the filled length
from the position ids (exporters/onnx/group_query_attention.py); other ONNX Runtime apps may pass
a past of exactly the filled length and take the grown present, the same graph."""

from __future__ import annotations

import hashlib
import json

from edgepack import __version__
from edgepack.exporters.onnx_capture import INPUT_IDS, LOGITS, PAST, POSITION_IDS, PRESENT


def metadata_props(loaded, quant, generation: dict | None) -> dict[str, str]:
    """String key/values (ONNX allows nothing else); structured facts as JSON."""
    tok = loaded.tokenizer
    props = {
        "name": loaded.name,
        "version": loaded_version(loaded),
        "edgepack_version": __version__,
        "task": loaded.task,
        "quantization": json.dumps(quant.describe(), sort_keys=True),
    }
    if tok is not None:
        props["tokenizer"] = json.dumps(tok.stop_facts(), sort_keys=True)
    if generation:
        props["generation"] = json.dumps(generation, sort_keys=True)
    return props


def loaded_version(loaded) -> str:
    """A stable version string: the digest of the source weights when there are files, else edgepack's."""
    if not loaded.weight_files:
        return f"edgepack {__version__}"
    return "weights " + hashlib.sha256("".join(h for _, h in loaded.weight_files).encode()).hexdigest()[:16]


# The model types onnxruntime-genai (0.18) runs as its plain decoder-only model, edgepack's graph.
# It runs others its own way (gpt2 with one combined past a layer) or not at all; for those the
# config names its generic "decoder" type.
GENAI_DECODER_TYPES = frozenset({"chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "granite", "internlm2",
                                 "llama", "mistral", "nemotron", "olmo", "phi", "phi3", "phimoe", "qwen2", "qwen3",
                                 "smollm3"})


def genai_config(facts, tokenizer, max_seq_len: int, model_file: str) -> dict:
    """onnxruntime-genai's genai_config.json for a decoder LM exported by edgepack."""
    eos = list(tokenizer.eos_ids) if tokenizer and tokenizer.eos_ids else []
    model = {
        "type": facts.model_type if facts.model_type in GENAI_DECODER_TYPES else "decoder",
        "context_length": max_seq_len,
        "vocab_size": facts.vocab_size,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": model_file,
            "head_size": facts.head_dim,
            "hidden_size": facts.hidden_size,
            "num_attention_heads": facts.n_heads,
            "num_hidden_layers": facts.n_layers,
            "num_key_value_heads": facts.n_kv_heads,
            "inputs": {"input_ids": INPUT_IDS, "position_ids": POSITION_IDS,
                       "past_key_names": PAST[0], "past_value_names": PAST[1]},
            "outputs": {"logits": LOGITS, "present_key_names": PRESENT[0], "present_value_names": PRESENT[1]},
        },
    }
    if eos:
        model["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    if tokenizer and tokenizer.bos_id is not None:
        model["bos_token_id"] = tokenizer.bos_id
    pad = tokenizer.pad_id if tokenizer and tokenizer.pad_id is not None else (eos[0] if eos else None)
    if pad is not None:
        model["pad_token_id"] = pad
    search = {
        "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": max_seq_len, "min_length": 0,
        "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
        "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
        "past_present_share_buffer": True,
    }
    return {"model": model, "search": search}


def dumps(config: dict) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
