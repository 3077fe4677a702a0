"""The .onnx on ONNX Runtime (InferenceSession, CPU execution provider: the kernels ONNX Runtime
Mobile runs on Android and iOS), behind the golden cases' calling convention.

LMs: forward(tokens [1, T], input_pos [1]) -> logits [1, vocab] becomes what onnxruntime-genai
does: position_ids = input_pos .. input_pos + T - 1, the past caches from the previous call (empty
at position 0), and the returned present caches kept for the next call. Other models: the inputs
by the names the manifest lists, the outputs in its order."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgepack.cases import MethodCall
from edgepack.errors import RuntimeUnavailableError, SmokeFailure


def session(path: Path, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeUnavailableError("ONNX Runtime is not installed", hint="pip install 'edgepack[onnx]'") from e
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _LlmSession:
    """One sequence's state: the caches, as long as the tokens seen so far."""

    def __init__(self, sess, method: dict):
        self.sess = sess
        self.past = [i for i in method["inputs"] if i["name"].startswith("past_key_values.")]
        self.present = [o["name"] for o in method["outputs"] if o["name"].startswith("present.")]
        self.cache = self._empty()

    def _empty(self) -> list[np.ndarray]:
        return [np.zeros([0 if isinstance(d, str) else d for d in i["shape"]], np.float32) for i in self.past]

    def forward(self, tokens: np.ndarray, input_pos: np.ndarray) -> np.ndarray:
        start, length = int(input_pos.reshape(-1)[0]), tokens.shape[1]
        seen = self.cache[0].shape[2]
        if start > seen:
            raise SmokeFailure(f"forward at position {start} but the cache holds {seen} positions")
        # Position 0 starts a new sequence; an earlier position rewinds (the cache is cut there).
        cache = self._empty() if start == 0 else [c[:, :, :start] for c in self.cache]
        feeds = {"input_ids": tokens.astype(np.int64),
                 "position_ids": np.arange(start, start + length, dtype=np.int64)[None],
                 **{i["name"]: c for i, c in zip(self.past, cache)}}
        logits, *present = self.sess.run(["logits", *self.present], feeds)
        self.cache = present
        return logits.reshape(1, -1)


def onnx_host(path: Path, artifact: dict) -> MethodCall:
    sess = session(path)
    [method] = artifact["methods"]
    if any(i["name"].startswith("past_key_values.") for i in method["inputs"]):
        state = _LlmSession(sess, method)

        def call(_: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
            return [state.forward(*inputs)]

        return call

    names = [i["name"] for i in method["inputs"]]
    outputs = [o["name"] for o in method["outputs"]]

    def call(_: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return sess.run(outputs, {n: np.ascontiguousarray(x) for n, x in zip(names, inputs)})

    return call
