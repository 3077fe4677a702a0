"""The benchmark's reference model, written twice from one set of random weights: as a Hugging Face
directory (what edgepack exports) and as the params.json + checkpoint ExecuTorch's `export_llm`
reads (Meta's Llama layout, HF rotary convention)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# SmolLM2-135M's shape (issue 7): 134.5M parameters with the embedding tied to the LM head.
S135 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3)
# --quick: the same architecture, two layers: small enough for CI.
QUICK = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
COMMON = dict(max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class BenchModel:
    name: str
    hf_dir: Path
    params: Path | None  # export_llm's files, when written
    checkpoint: Path | None
    n_params: int  # tied weights once
    embedding_params: int


def build(out_dir: Path, quick: bool, seed: int = 0) -> BenchModel:
    return build_shape(out_dir, "s135-quick" if quick else "s135", QUICK if quick else S135, seed)


def build_shape(out_dir: Path, name: str, shape: dict, seed: int = 0, *, meta: bool = True) -> BenchModel:
    """A random-weight Llama of `shape` (S135's other settings) in `out_dir`/`name`/hf, and with
    `meta` the params.json + checkpoint export_llm reads beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = out_dir / name
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape, **COMMON)).eval()
    model.save_pretrained(root / "hf", safe_serialization=True)
    return _bench_model(model, name, root / "hf", root if meta else None)


def from_hf_dir(hf_dir: Path, out_dir: Path) -> BenchModel:
    """A Llama-architecture Hugging Face directory (the real SmolLM2-135M-Instruct) with export_llm's
    params.json + checkpoint written beside it in `out_dir`."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return _bench_model(model, hf_dir.name, hf_dir, out_dir)


def _bench_model(model, name: str, hf_dir: Path, meta_dir: Path | None) -> BenchModel:
    """`model` as the bench knows it; with `meta_dir`, export_llm's params.json + checkpoint written there."""
    params = checkpoint = None
    if meta_dir is not None:
        meta_dir.mkdir(parents=True, exist_ok=True)
        params, checkpoint = meta_dir / "params.json", meta_dir / "checkpoint.pth"
        torch.save(meta_state_dict(model), checkpoint)
        params.write_text(json.dumps(meta_params(model.config), indent=2))
    n_params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return BenchModel(name, hf_dir, params, checkpoint, n_params, model.model.embed_tokens.weight.numel())


def meta_params(config) -> dict:
    """export_llm's params.json for the same architecture. use_hf_rope keeps HF's rotate-half
    rotary layout, so q/k weights need no permutation."""
    return {
        "dim": config.hidden_size, "hidden_dim": config.intermediate_size, "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size, "norm_eps": config.rms_norm_eps, "rope_theta": config.rope_parameters["rope_theta"],
        "use_scaled_rope": False, "use_hf_rope": True,
    }


def meta_state_dict(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["model.embed_tokens.weight"]}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(model.config.num_hidden_layers):
        for hf, meta in names.items():
            out[f"layers.{i}.{meta}.weight"] = sd[f"model.layers.{i}.{hf}.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}
