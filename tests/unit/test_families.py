"""Per family, in seconds: every form edgepack gives a decoder LM answers like Hugging Face's own
forward (`AutoModelForCausalLM`, the whole prompt at once), step by step through its KV cache, on a
prompt longer than any sliding window: the captured model (the golden fp32 answers come from it),
ExecuTorch's fast path (llama::custom_sdpa / update_cache), and the forms the TFLite and ONNX
(onnxruntime-genai) backends trace, with the grouped-query attention they trace them under. A wrapper that drops a window mask, a rotary position or a cache write fails here,
whatever the backends then do with it."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from demo_model.build import DECODER_CONFIGS, decoder_config
from edgepack.exporters.architectures import FAMILIES, linearize, model_facts
from edgepack.exporters.attention import NAME as GROUPED
from edgepack.exporters.attention import grouped_query_attention
from edgepack.exporters.decoder import ExplicitCacheLM, StaticCacheLM

PROMPT = 40  # > every test config's sliding window (16)
PREFILL = 8  # the first chunk, then one token per call
MAX_SEQ_LEN = 64
TOLERANCE = 2e-4  # fp32 logits of a random tiny model are O(1); kernels reorder sums


def _model(family: str, rope_parameters: dict | None = None):
    torch.manual_seed(0)
    config = decoder_config(family, rope_parameters=rope_parameters)
    config._attn_implementation = "eager"
    from transformers import AutoModelForCausalLM

    model = linearize(AutoModelForCausalLM.from_config(config)).eval().requires_grad_(False)
    family_row = next(f for f in FAMILIES if config.model_type in f.model_types)
    return model, model_facts(family_row, config)


def _prompt(vocab: int) -> torch.Tensor:
    return torch.randint(4, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def _reference(model, tokens) -> np.ndarray:
    """Hugging Face's own forward: the logits after each prompt position from PREFILL - 1 on."""
    with torch.no_grad():
        return model(input_ids=tokens).logits[0, PREFILL - 1:].numpy()


def _stepwise(call, tokens) -> np.ndarray:
    """forward(tokens [1, T], input_pos [1]) -> logits: the prefill chunk, then one token at a time."""
    rows = [call(tokens[:, :PREFILL], 0)]
    rows += [call(tokens[:, p:p + 1], p) for p in range(PREFILL, PROMPT)]
    return np.stack([np.asarray(r).reshape(-1) for r in rows])


def _static_cache_call(module):
    def call(chunk, pos):
        with torch.no_grad():
            return module(chunk, torch.tensor([pos])).numpy()
    return call


def _explicit_cache_call(module: ExplicitCacheLM):
    state = {"cache": module.empty_cache()}

    def call(chunk, pos):
        with torch.no_grad():
            out = module(chunk, torch.arange(pos, pos + chunk.shape[1]), state["cache"])
        state["cache"] = out["kv_cache"]
        return out["logits"][0, -1].numpy()
    return call


def _slice_write(cache, new, input_pos):
    """The TFLite cache write (DYNAMIC_UPDATE_SLICE at input_pos[0]) in eager torch."""
    out = cache.clone()
    out[:, :, int(input_pos[0]):int(input_pos[0]) + new.shape[2]] = new
    return out


@contextlib.contextmanager
def _traced_attention(model, facts):
    """The attention the TFLite and ONNX backends trace: grouped-query where the model has
    fewer KV heads than query heads (every test config but GPT-2's), the model's own otherwise."""
    with grouped_query_attention(model):
        assert (model.config._attn_implementation == GROUPED) == (facts.n_kv_heads < facts.n_heads)
        yield
    assert model.config._attn_implementation == "eager"


def _check(name: str, got: np.ndarray, want: np.ndarray) -> None:
    diff = np.abs(got - want).max(axis=1)
    assert diff.max() < TOLERANCE, f"{name}: logits leave Hugging Face's at prompt position {int(diff.argmax()) + PREFILL - 1} (max abs diff {diff.max():.3g})"


FAMILY_NAMES = tuple(DECODER_CONFIGS)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_captured_model_answers_like_hugging_face(family):
    model, facts = _model(family)
    tokens = _prompt(facts.vocab_size)
    _check("StaticCacheLM", _stepwise(_static_cache_call(StaticCacheLM(model, facts, MAX_SEQ_LEN).eval()), tokens),
           _reference(model, tokens))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_executorch_fast_path_answers_like_hugging_face(family):
    from edgepack.exporters.executorch.llm_ops import use_llm_custom_ops

    model, facts = _model(family)
    tokens = _prompt(facts.vocab_size)
    want = _reference(model, tokens)
    fast, reason = use_llm_custom_ops(StaticCacheLM(copy.deepcopy(model), facts, MAX_SEQ_LEN).eval())
    if family == "gemma2":  # logit soft-capping: the plain path stays, and says why
        assert reason and "soft-capping" in reason
    else:
        assert reason is None and type(fast).__name__ == "CustomOpCacheLM"
    _check("the ExecuTorch fast path", _stepwise(_static_cache_call(fast), tokens), want)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tflite_signatures_answer_like_hugging_face(family):
    model, facts = _model(family)
    tokens = _prompt(facts.vocab_size)
    want = _reference(model, tokens)
    module = ExplicitCacheLM(model, facts, MAX_SEQ_LEN, _slice_write).eval()
    with _traced_attention(model, facts):
        _check("ExplicitCacheLM", _stepwise(_explicit_cache_call(module), tokens), want)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_onnx_decoder_answers_like_hugging_face(family):
    from edgepack.exporters.onnx_capture import PastPresentDecoder

    model, facts = _model(family)
    tokens = _prompt(facts.vocab_size)
    decoder = PastPresentDecoder(model, facts).eval()
    state = {"past": {f"{k}_{i}": torch.zeros(1, facts.n_kv_heads, 0, facts.head_dim) for i in range(facts.n_layers) for k in "kv"}}

    def call(chunk, pos):
        with torch.no_grad():
            logits, *present = decoder(chunk, torch.arange(pos, pos + chunk.shape[1])[None], state["past"])
        state["past"] = {f"{k}_{i}": present[2 * i + (k == "v")] for i in range(facts.n_layers) for k in "kv"}
        return logits[0, -1].numpy()

    want = _reference(model, tokens)
    with _traced_attention(model, facts):
        _check("PastPresentDecoder", _stepwise(call, tokens), want)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("path", ["captured", "executorch fast path"])
def test_teacher_forced_pass_answers_like_stepwise_decoding(family, path):
    """The quantized references run teacher-forced cases in one prefill (capture.run_forced): past
    every test config's sliding window, each step's logits are those of decoding step by step."""
    from edgepack.cases import Case, CaseOutput
    from edgepack.exporters.capture import eager_call, run_cases, run_forced
    from edgepack.exporters.executorch.llm_ops import use_llm_custom_ops

    model, facts = _model(family)
    module = StaticCacheLM(model, facts, MAX_SEQ_LEN).eval()
    if path != "captured":
        module, _ = use_llm_custom_ops(module)
    case = Case("greedy", "greedy", "forward", (_prompt(facts.vocab_size)[:, :PREFILL].numpy(),), ("tokens",), steps=24)
    fed = torch.randint(4, facts.vocab_size, (24,), generator=torch.Generator().manual_seed(2)).numpy()
    forced = {"greedy": CaseOutput(("tokens", "logits"), (fed, np.zeros((24, facts.vocab_size), np.float32)))}
    stepwise = run_cases(eager_call(module), (case,), forced)["greedy"]
    one_pass = run_forced(module, (case,), forced)["greedy"]
    assert one_pass.get("logits").shape == (24, facts.vocab_size)
    _check(f"{path}, one pass", one_pass.get("logits"), stepwise.get("logits"))
    np.testing.assert_array_equal(one_pass.get("tokens"), stepwise.get("tokens"))


GEMMA3_DYNAMIC_GLOBAL = {"full_attention": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}


@pytest.mark.parametrize("family", ["llama_dynamic", "phi3_longrope", "llama3", "gemma3", "gemma3_dynamic_global"])
def test_only_ropes_that_switch_by_length_are_held_static_and_only_where_they_are(family):
    """hold_rope_static names a rotary plain only where transformers' own would keep its first
    frequencies (dynamic NTK within the model's positions, LongRoPE within its original 256; on
    Gemma 3 per layer type), and the model then answers as before; other ropes keep their names."""
    from edgepack.exporters.decoder import hold_rope_static

    model, facts = _model("gemma3", GEMMA3_DYNAMIC_GLOBAL) if family == "gemma3_dynamic_global" else _model(family)
    rotary = model.model.rotary_emb
    before = copy.deepcopy(rotary.rope_type)
    if family == "phi3_longrope":
        hold_rope_static(model, facts, 257)  # past the original length: the switch stays
        assert rotary.rope_type == "longrope"
    tokens = _prompt(facts.vocab_size)
    want = _reference(model, tokens)
    hold_rope_static(model, facts, facts.max_positions if family == "llama_dynamic" else MAX_SEQ_LEN)
    held = {"llama_dynamic": "default", "phi3_longrope": "default",
            "gemma3_dynamic_global": {"full_attention": "default", "sliding_attention": "default"}}
    assert rotary.rope_type == held.get(family, before), (rotary.rope_type, before)
    assert family != "gemma3_dynamic_global" or before["full_attention"] == "dynamic"
    _check("the held rope", _reference(model, tokens), want)
