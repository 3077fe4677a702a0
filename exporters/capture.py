"""Front end, part 3: give every model a fixed calling convention, golden cases, and the fp32
eager answers to them. Backends lower `CapturedModel.module`; nothing here is backend-specific."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch.export import Dim

from edgepack.cases import Case, CaseOutput, MethodCall, Tolerance, compare, run_case
from edgepack.errors import InputError
from edgepack.exporters.decoder import POOLINGS, EncoderOutput, StaticCacheLM, hold_rope_static
from edgepack.exporters.tokenizer import encode
from edgepack.stages import CapturedModel, LoadedModel, MethodSpec, TensorSpec

GOLDEN_PROMPT = "The river ran past the old mill, and the children"
GOLDEN_STEPS = 16
GOLDEN_SENTENCES = (
    "The weather is lovely today.",
    "Phones run small models on the device.",
    "Où est la gare ? 駅はどこですか。",
)
DEFAULT_MAX_SEQ_LEN = 2048


def eager_call(module: torch.nn.Module) -> MethodCall:
    def call(method: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().numpy() for o in outs]
    return call


def run_cases(call: MethodCall, cases: Sequence[Case], forced: dict[str, CaseOutput] | None = None) -> dict[str, CaseOutput]:
    return {c.name: run_case(c, call, forced[c.name] if forced else None) for c in cases}


def run_forced(module: torch.nn.Module, cases: Sequence[Case], forced: dict[str, CaseOutput]) -> dict[str, CaseOutput]:
    """run_cases(eager_call(module), cases, forced), with a decoder LM's greedy case in one pass:
    the prompt and the forced tokens prefilled at once, each step's logits read at its position.
    The same logits up to float summation order, for one forward instead of one per step (the
    quantized references' dequantizing forwards took 12 of a 1B model's 25 minutes of lowering)."""
    if not isinstance(module, StaticCacheLM):
        return run_cases(eager_call(module), cases, forced)
    outputs = {}
    for case in cases:
        prompt = case.inputs[0].reshape(1, -1).astype(np.int64)
        fed = np.concatenate([prompt, forced[case.name].get("tokens")[None, :case.steps - 1]], axis=1)
        with torch.no_grad():
            logits = module.position_logits(torch.from_numpy(fed), torch.tensor([0])).float().numpy()
        rows = logits[prompt.shape[1] - 1:]
        outputs[case.name] = CaseOutput(("tokens", "logits"), (rows.argmax(-1).astype(np.int64), rows))
    return outputs


# The nudge that measures a quantized model's own numeric noise: every linear layer's input
# multiplied by 1 ± NUDGE along its features, about what reordering a float sum does (a uniform
# scale would not do: dynamic int8 activations are scale-invariant). With int8 dynamic
# activations a nudge this small already flips roundings, and many layers amplify the flips
# (measured on the real SmolLM2-135M: logits cosine 0.98..0.99 between an int4 reference and
# itself nudged), so no artifact can be held closer to its reference than the reference is to
# itself. One sign pattern is one draw of that noise (four patterns on that model: min cosine
# 0.981 to 0.990), so the noise is the worst of NUDGE_PATTERNS: the signs alternating, then
# fixed pseudo-random ones.
NUDGE = 1e-6
NUDGE_PATTERNS = 2
# Below this the smoke tolerance is not lowered, whatever the nudge shows: a conversion bug
# still fails (and every step's top-1 must still match). 0.95 until 2026-12-05, when the real
# SmolLM2-135M's default ExecuTorch export failed its smoke on an Intel Xeon at 0.9434 on one step
# where its reference, nudged, measured 0.9453 against itself: the .pte was closer to fp32 there
# (0.982) than the reference (0.954), and 16 of 16 top-1s matched. Twice that noise is 0.89.
TOLERANCE_FLOOR = 0.90


@dataclass(frozen=True)
class Reference:
    """A backend's quantized eager model on the golden cases."""

    outputs: dict[str, CaseOutput]  # its free-running answers: what the artifact must reproduce
    quality: dict  # against fp32 eager, teacher-forced on fp32's tokens
    tolerance: Tolerance  # the smoke's bounds for the artifact


@functools.lru_cache(maxsize=None)
def _nudge_factors(features: int, pattern: int, dtype: torch.dtype) -> torch.Tensor:
    """1 ± NUDGE per feature, signs alternating (pattern 0) or fixed pseudo-random. Kept: every
    linear of a width multiplies by the same factors at every step."""
    if pattern == 0:
        signs = 1 - 2 * (torch.arange(features) % 2)
    else:
        signs = 1 - 2 * torch.randint(0, 2, (features,), generator=torch.Generator().manual_seed(pattern))
    return 1 + NUDGE * signs.to(dtype)


@contextmanager
def linear_inputs_hooked(module: torch.nn.Module, change, prepend: bool = False):
    """Every nn.Linear's input x replaced by change(x) while inside; `prepend` puts it ahead of
    the hooks a layer already has."""
    def hook(_, args):
        return (change(args[0]), *args[1:])

    handles = [m.register_forward_pre_hook(hook, prepend=prepend) for m in module.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def nudged_linear_inputs(module: torch.nn.Module, pattern: int = 0):
    """Every nn.Linear's input nudged (see NUDGE) with sign pattern `pattern`, ahead of any hook
    the backend's reference already has (e.g. the int8 activation rounding it simulates)."""
    return linear_inputs_hooked(module, lambda x: x * _nudge_factors(x.shape[-1], pattern, x.dtype), prepend=True)


def quantized_reference(module: torch.nn.Module, captured: CapturedModel) -> Reference:
    """The reference's answers, its quality, and the smoke tolerance for its artifact: the
    captured tolerance, loosened only as far as the reference's own noise requires (twice the
    deviation the worst of NUDGE_PATTERNS nudges causes, not below TOLERANCE_FLOOR)."""
    free = run_cases(eager_call(module), captured.cases)
    forced = run_forced(module, captured.cases, captured.fp32_outputs)
    quality = {c.name: compare(captured.fp32_outputs[c.name], forced[c.name]) for c in captured.cases}
    noise = 1.0
    for pattern in range(NUDGE_PATTERNS):
        with nudged_linear_inputs(module, pattern):
            nudged = run_forced(module, captured.cases, free)
        noise = min(noise, *(compare(free[c.name], nudged[c.name])["min_cosine"] for c in captured.cases))
    base = captured.tolerance
    loosened = max(TOLERANCE_FLOOR, round(1 - 2 * (1 - noise), 4))
    tolerance = replace(base, min_cosine=min(base.min_cosine, loosened), nudged_cosine=noise)
    return Reference(free, quality, tolerance)


def _spec(name: str, t: torch.Tensor, dims: dict[int, str] | None = None) -> TensorSpec:
    shape = tuple((dims or {}).get(i, s) for i, s in enumerate(t.shape))
    return TensorSpec(name, str(t.dtype).removeprefix("torch."), shape)


@dataclass(frozen=True)
class CaptureOptions:
    max_seq_len: int | None = None  # decoder KV cache length / encoder max tokens
    pooling: str = "none"  # encoders: see POOLINGS

    def decoder_length(self, facts) -> int:
        """A decoder LM's KV cache length: --max-seq-len, else the model's positions up to DEFAULT_MAX_SEQ_LEN."""
        return self.max_seq_len or min(facts.max_positions, DEFAULT_MAX_SEQ_LEN)

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise InputError(f"--pooling {self.pooling!r} is not a pooling", hint=f"choose one of {', '.join(POOLINGS)}")


def capture_decoder_lm(loaded: LoadedModel, options: CaptureOptions) -> CapturedModel:
    facts = loaded.facts
    max_seq_len = options.decoder_length(facts)
    if not 2 <= max_seq_len <= facts.max_positions:
        raise InputError(f"--max-seq-len {max_seq_len} is outside 2..{facts.max_positions} (the model's max positions)")
    hold_rope_static(loaded.module, facts, max_seq_len)
    module = StaticCacheLM(loaded.module, facts, max_seq_len).eval()
    tok = loaded.tokenizer
    prompt_ids = encode(tok, GOLDEN_PROMPT) if tok else list(range(1, 9))
    if len(prompt_ids) + GOLDEN_STEPS > max_seq_len:
        raise InputError(f"--max-seq-len {max_seq_len} is too short for the smoke prompt ({len(prompt_ids)} tokens + {GOLDEN_STEPS} steps)")
    prompt = np.array([prompt_ids], dtype=np.int64)
    cases = (Case("greedy", "greedy", "forward", (prompt,), ("tokens",), steps=GOLDEN_STEPS,
                  note=f"prompt {GOLDEN_PROMPT!r}" if tok else "fixed token ids"),)
    example = (torch.from_numpy(prompt), torch.tensor([0], dtype=torch.int64))
    seq = Dim("seq_len", min=1, max=max_seq_len - 1)
    logits = torch.zeros(1, facts.vocab_size)
    method = MethodSpec(
        "forward",
        inputs=(_spec("tokens", example[0], {1: "seq_len"}), _spec("input_pos", example[1])),
        outputs=(_spec("logits", logits),),
        dynamic_dims={"seq_len": (1, max_seq_len - 1)},
    )
    metadata = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": facts.vocab_size,
        "get_n_layers": facts.n_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
    }
    if tok and tok.bos_id is not None:
        metadata["get_bos_id"] = tok.bos_id
    if tok and tok.eos_ids:
        metadata["get_eos_ids"] = list(tok.eos_ids)
    fp32 = run_cases(eager_call(module), cases)
    return CapturedModel(loaded, module, example, ({1: seq}, None), (method,), cases, fp32,
                         Tolerance(min_cosine=0.99), metadata)


def capture_encoder(loaded: LoadedModel, options: CaptureOptions) -> CapturedModel:
    facts, tok = loaded.facts, loaded.tokenizer
    module = EncoderOutput(loaded.module, options.pooling).eval()
    limit = options.max_seq_len or facts.max_positions
    sentences = [encode(tok, s)[:limit] for s in GOLDEN_SENTENCES] if tok else [list(range(1, 9))]
    cases = tuple(
        Case(f"sentence-{i}", "tensors", "forward",
             (np.array([ids], dtype=np.int64), np.ones((1, len(ids)), dtype=np.int64)),
             ("input_ids", "attention_mask"), note=GOLDEN_SENTENCES[i] if tok else "fixed token ids")
        for i, ids in enumerate(sentences)
    )
    example = tuple(torch.from_numpy(x) for x in cases[0].inputs)
    seq = Dim("seq_len", min=2, max=limit)
    output = (_spec("last_hidden_state", torch.zeros(1, 1, facts.hidden_size), {1: "seq_len"})
              if options.pooling == "none" else _spec("sentence_embedding", torch.zeros(1, facts.hidden_size)))
    method = MethodSpec(
        "forward",
        inputs=(_spec("input_ids", example[0], {1: "seq_len"}), _spec("attention_mask", example[1], {1: "seq_len"})),
        outputs=(output,),
        dynamic_dims={"seq_len": (2, limit)},
    )
    fp32 = run_cases(eager_call(module), cases)
    return CapturedModel(loaded, module, example, ({1: seq}, {1: seq}), (method,), cases, fp32,
                         Tolerance(min_cosine=0.99), {})


def capture_module(loaded: LoadedModel, options: CaptureOptions) -> CapturedModel:
    module = loaded.module
    example = tuple(loaded.example_inputs)
    names = tuple(f"input_{i}" for i in range(len(example)))
    case = Case("example", "tensors", "forward", tuple(t.detach().numpy() for t in example), names,
                note="the example inputs")
    fp32 = run_cases(eager_call(module), (case,))
    outputs = fp32[case.name].arrays
    method = MethodSpec(
        "forward",
        inputs=tuple(_spec(n, t) for n, t in zip(names, example)),
        outputs=tuple(TensorSpec(f"output_{i}", str(o.dtype), tuple(o.shape)) for i, o in enumerate(outputs)),
    )
    return CapturedModel(loaded, module, example, loaded.dynamic_shapes, (method,), (case,), fp32,
                         Tolerance(min_cosine=0.99), {})


CAPTURE_BY_TASK: dict[str, Callable[[LoadedModel, CaptureOptions], CapturedModel]] = {
    "causal-lm": capture_decoder_lm,
    "encoder": capture_encoder,
    "module": capture_module,
}


def capture(loaded: LoadedModel, options: CaptureOptions = CaptureOptions()) -> CapturedModel:
    if options.pooling != "none" and loaded.task != "encoder":
        raise InputError(f"--pooling {options.pooling} applies to encoders; {loaded.source} is a {loaded.task}")
    return CAPTURE_BY_TASK[loaded.task](loaded, options)
