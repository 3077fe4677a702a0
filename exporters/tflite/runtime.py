"""The .tflite on the LiteRT interpreter (ai_edge_litert: the runtime code Android ships, with its
XNNPACK delegate), behind the golden cases' calling convention.

LMs: forward(tokens [1, T], input_pos [1]) -> logits [1, vocab] becomes what an app does with
LiteRT's LLM signatures: the first T - 1 tokens go through prefill_<N> (in chunks of N, padded),
the last one through decode, whose logits are the answer; the KV caches returned by each call are
passed to the next. The padded positions write junk into the cache beyond the prompt, which the
causal mask hides and the following decode steps overwrite. Other models: serving_default."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgepack.cases import MethodCall
from edgepack.errors import RuntimeUnavailableError, SmokeFailure


def _interpreter(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise RuntimeUnavailableError("the LiteRT interpreter is not installed",
                                      hint="pip install 'edgepack[tflite]'") from e
    return Interpreter(model_path=str(path))


def _int32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.int32) if array.dtype == np.int64 else array


class _LlmSession:
    """One sequence's state: the KV caches, carried from call to call."""

    def __init__(self, interpreter):
        signatures = interpreter.get_signature_list()
        self.decode = interpreter.get_signature_runner("decode")
        self.prefill = {int(name.removeprefix("prefill_")): interpreter.get_signature_runner(name)
                        for name in signatures if name.startswith("prefill_")}
        details = self.decode.get_input_details()
        self.cache = {n: np.zeros(d["shape"], d["dtype"]) for n, d in details.items() if n.startswith("kv_cache_")}
        self.max_seq_len = int(next(iter(self.cache.values())).shape[2])

    def _run(self, runner, tokens: np.ndarray, positions: np.ndarray) -> dict:
        out = runner(tokens=tokens.astype(np.int32), input_pos=positions.astype(np.int32), **self.cache)
        self.cache = {n: out[n] for n in self.cache}
        return out

    def _prefill(self, tokens: np.ndarray, start: int) -> None:
        done = 0
        while done < tokens.size:
            left = tokens.size - done
            length = min((n for n in self.prefill if n >= left), default=max(self.prefill))
            pos = start + done
            if pos + length > self.max_seq_len:
                # TFLite's DYNAMIC_UPDATE_SLICE clamps a write that would run past the cache, which
                # would shift it over real entries: refuse instead of answering wrongly.
                raise SmokeFailure(f"prefill_{length} at position {pos} runs past the KV cache ({self.max_seq_len})")
            chunk = np.zeros((1, length), np.int32)
            n = min(left, length)
            chunk[0, :n] = tokens[done:done + n]
            self._run(self.prefill[length], chunk, np.arange(pos, pos + length))
            done += n

    def forward(self, tokens: np.ndarray, input_pos: np.ndarray) -> np.ndarray:
        tokens, start = tokens.reshape(-1), int(input_pos.reshape(-1)[0])
        if tokens.size > 1:
            self._prefill(tokens[:-1], start)
        out = self._run(self.decode, tokens[-1:].reshape(1, 1), np.array([start + tokens.size - 1]))
        return out["logits"].reshape(1, -1)


def tflite_host(path: Path, artifact: dict) -> MethodCall:
    interpreter = _interpreter(path)
    signatures = interpreter.get_signature_list()
    if "decode" in signatures:
        session = _LlmSession(interpreter)

        def call(method: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
            return [session.forward(*inputs)]

        return call

    [method] = [m for m in artifact["methods"] if m["name"] == "serving_default"]
    runner = interpreter.get_signature_runner("serving_default")
    names = [i["name"] for i in method["inputs"]]
    outputs = [o["name"] for o in method["outputs"]]

    expected = runner.get_input_details()

    def call(_: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        # Dimensions exported at a fixed length (an encoder's sequence): pad with zeros (token 0,
        # attention_mask 0), then cut the outputs back to the real length.
        arrays, real = {}, {}
        for n, x in zip(names, inputs):
            want = expected[n]["shape"]
            pad = [(0, int(w) - s) if w != s else (0, 0) for s, w in zip(x.shape, want)]
            real.update({int(w): s for s, w in zip(x.shape, want) if w != s})
            arrays[n] = _int32(np.pad(x, pad)) if any(p for _, p in pad) else _int32(np.ascontiguousarray(x))
        out = runner(**arrays)
        return [out[n][tuple(slice(0, real.get(s, s)) for s in out[n].shape)] for n in outputs]

    return call
