"""One artifact's host speed and logits, in a process of its own (so neither runtime's threads,
caches nor memory colour the other's numbers):

    python -m bench.speed BACKEND ARTIFACT_PATH ARTIFACT_JSON TOKENS.npy PROMPT_LEN REPEATS OUT.npz

The artifact runs through the same host runtime adapter `edgepack smoke` uses
(the registry's host_runtime). Each repeat prefills the prompt (one call, T = PROMPT_LEN) and then
decodes the rest of TOKENS one token per call, teacher-forced, so every artifact sees the same
inputs; one uncounted repeat warms the runtime up first; the logits of the first counted repeat are kept for the cosine against fp32 eager.

BACKEND `litertlm` is a .litertlm on the LiteRT-LM engine (what Android apps embed), through the
engine's own Benchmark (ARTIFACT_JSON and the token values unused: the engine takes PROMPT_LEN
prefill tokens and decodes len(TOKENS) - PROMPT_LEN, greedy, on its CPU backend at one thread a core); the
first of its runs warms up and is not counted. It gives speeds, no logits.

BACKEND `genai` is a folder with a genai_config.json (edgepack's onnx/, or onnxruntime-genai's own
model builder's output) on onnxruntime-genai's generator, the same tokens appended teacher-forced;
ARTIFACT_JSON unused. Speeds only."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from edgepack.exporters.registry import BACKENDS


def measure(backend: str, path: Path, artifact: dict, tokens: np.ndarray, prompt_len: int, repeats: int) -> dict:
    call = BACKENDS[backend].host_call(path, artifact)
    prefill_s, decode_s, logits = [], [], []
    for repeat in range(-1, repeats):  # repeat -1 warms up the runtime (allocations, thread pool) and is not counted
        rows = []
        start = time.perf_counter()
        rows.append(call("forward", [tokens[None, :prompt_len], np.array([0], dtype=np.int64)])[0])
        prefill_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for pos in range(prompt_len, len(tokens)):
            rows.append(call("forward", [tokens[None, pos:pos + 1], np.array([pos], dtype=np.int64)])[0])
        decode_s.append(time.perf_counter() - start)
        if repeat < 0:
            prefill_s.clear(), decode_s.clear()
        if repeat == 0:
            logits = np.concatenate([r.reshape(1, -1) for r in rows])
    steps = len(tokens) - prompt_len
    return {
        "prefill_tokens_per_s": [prompt_len / s for s in prefill_s],
        "decode_tokens_per_s": [steps / s for s in decode_s],
        "logits": logits,
    }


# The LiteRT-LM engine's CPU backend runs 4 threads unless told otherwise; on a 2-core host that
# decoded the real SmolLM2-135M at 0.74x of 2 threads (interleaved rounds, 2026-12-06). The bench
# gives it one thread per core, as ExecuTorch's runtime takes by default.
ENGINE_THREADS = os.cpu_count() or 1


def engine_backend():
    """The engine's CPU backend at ENGINE_THREADS threads."""
    from litert_lm import interfaces

    return interfaces.Backend.CPU(thread_count=ENGINE_THREADS)


def measure_litertlm(path: Path, tokens: np.ndarray, prompt_len: int, repeats: int) -> dict:
    import tempfile

    import litert_lm

    steps = len(tokens) - prompt_len
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    runs = []
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-litertlm-") as cache:  # its compiled weight cache
        for _ in range(repeats + 1):
            runs.append(litert_lm.Benchmark(str(path), engine_backend(), prefill_tokens=prompt_len,
                                            decode_tokens=steps, cache_dir=cache).run())
    counted = runs[1:]
    if any(r.last_prefill_token_count != prompt_len or r.last_decode_token_count != steps for r in counted):
        raise SystemExit(f"the LiteRT-LM engine ran other token counts than asked: {counted}")
    return {"prefill_tokens_per_s": [r.last_prefill_tokens_per_second for r in counted],
            "decode_tokens_per_s": [r.last_decode_tokens_per_second for r in counted]}


def measure_genai(folder: Path, tokens: np.ndarray, prompt_len: int, repeats: int) -> dict:
    """A folder with a genai_config.json on onnxruntime-genai's generator (what ONNX Runtime's mobile
    LLM apps run): the prompt appended at once, then each later token appended alone, teacher-forced."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    prefill_s, decode_s = [], []
    for repeat in range(-1, repeats):  # repeat -1 warms up and is not counted
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(tokens) + 1, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(tokens[:prompt_len].astype(np.int32))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for token in tokens[prompt_len:]:
            generator.append_tokens(np.array([token], dtype=np.int32))
        decode = time.perf_counter() - start
        if repeat >= 0:
            prefill_s.append(prefill)
            decode_s.append(decode)
    steps = len(tokens) - prompt_len
    return {"prefill_tokens_per_s": [prompt_len / s for s in prefill_s], "decode_tokens_per_s": [steps / s for s in decode_s]}


# runtimes measured through their own loops, which give speeds and no logits
SPEEDS_ONLY = {"litertlm": measure_litertlm, "genai": measure_genai}


def main(argv: list[str]) -> None:
    backend, path, artifact_json, tokens, prompt_len, repeats, out = argv
    if backend in SPEEDS_ONLY:
        result = SPEEDS_ONLY[backend](Path(path), np.load(tokens), int(prompt_len), int(repeats))
        np.savez(out, **{k: np.array(v) for k, v in result.items()})
        return
    result = measure(backend, Path(path), json.loads(artifact_json), np.load(tokens), int(prompt_len), int(repeats))
    np.savez(out, logits=result.pop("logits"), **{k: np.array(v) for k, v in result.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
