"""The golden cases' calling convention over a graph that takes its KV cache as inputs and returns
it grown (exporters/onnx_capture.py's convention), for the runtimes that run such graphs (ONNX
Runtime, MNN). No torch here: the emulated arm64 Python runs it too.

forward(tokens [1, T], input_pos [1]) -> logits [1, vocab] feeds position_ids = input_pos ..
input_pos + T - 1 and the caches the previous call returned (empty at position 0); an earlier
position rewinds (the caches are cut there), as an app's chat loop does on a new turn."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from edgepack.cases import MethodCall
from edgepack.errors import SmokeFailure

PAST_PREFIX = "past_key_values."


def takes_cache(method: dict) -> bool:
    return any(i["name"].startswith(PAST_PREFIX) for i in method["inputs"])


class GrowingCacheSession:
    """One sequence's state: the caches, as long as the tokens seen so far. `run` takes
    [input_ids, position_ids, *past] (int64 ids) and returns [logits, *present]."""

    def __init__(self, run: Callable[[list[np.ndarray]], list[np.ndarray]], method: dict):
        self.run = run
        self.past = [i for i in method["inputs"] if i["name"].startswith(PAST_PREFIX)]
        self.cache = self._empty()

    def _empty(self) -> list[np.ndarray]:
        return [np.zeros([0 if isinstance(d, str) else d for d in i["shape"]], np.float32) for i in self.past]

    def forward(self, tokens: np.ndarray, input_pos: np.ndarray) -> np.ndarray:
        start, length = int(input_pos.reshape(-1)[0]), tokens.shape[1]
        seen = self.cache[0].shape[2]
        if start > seen:
            raise SmokeFailure(f"forward at position {start} but the cache holds {seen} positions")
        cache = self._empty() if start == 0 else [c[:, :, :start] for c in self.cache]
        position_ids = np.arange(start, start + length, dtype=np.int64)[None]
        logits, *present = self.run([tokens.astype(np.int64), position_ids, *cache])
        self.cache = present
        return logits.reshape(1, -1)

    def call(self, _: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """As a MethodCall."""
        return [self.forward(*inputs)]


def session_call(run: Callable[[list[np.ndarray]], list[np.ndarray]], method: dict) -> MethodCall:
    return GrowingCacheSession(run, method).call
