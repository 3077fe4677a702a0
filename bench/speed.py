"""One artifact's host speed and logits, in a process of its own (so neither runtime's threads,
caches nor memory colour the other's numbers):

    python -m bench.speed BACKEND ARTIFACT_PATH ARTIFACT_JSON TOKENS.npy PROMPT_LEN REPEATS OUT.npz

The artifact runs through the same host runtime adapter `edgepack smoke` uses
(edgepack.packaging.runtimes). Each repeat prefills the prompt (one call, T = PROMPT_LEN) and then
decodes the rest of TOKENS one token per call, teacher-forced, so every artifact sees the same
inputs; one uncounted repeat warms the runtime up first; the logits of the first counted repeat are kept for the cosine against fp32 eager."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from edgepack.packaging.runtimes import HOST_RUNTIMES


def measure(backend: str, path: Path, artifact: dict, tokens: np.ndarray, prompt_len: int, repeats: int) -> dict:
    call = HOST_RUNTIMES[backend](path, artifact)
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


def main(argv: list[str]) -> None:
    backend, path, artifact_json, tokens, prompt_len, repeats, out = argv
    result = measure(backend, Path(path), json.loads(artifact_json), np.load(tokens), int(prompt_len), int(repeats))
    np.savez(out, logits=result.pop("logits"), **{k: np.array(v) for k, v in result.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
