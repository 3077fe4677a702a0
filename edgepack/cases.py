"""Golden cases: what is replayed through every artifact, and how answers are compared.

The same functions run the fp32 eager model, each backend's quantized eager reference and the
runtimes in the smoke harness, so all of them are driven identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np

# call(method, inputs) -> outputs. Inputs and outputs are numpy arrays.
MethodCall = Callable[[str, Sequence[np.ndarray]], Sequence[np.ndarray]]


@dataclass(frozen=True)
class Tolerance:
    """How close an artifact must be to its reference. Tokens, when present, must match exactly."""

    min_cosine: float
    max_abs: float | None = None

    def as_dict(self) -> dict:
        return {"min_cosine": self.min_cosine, "max_abs": self.max_abs, "tokens": "exact"}


@dataclass(frozen=True)
class Case:
    """One golden input. kind 'greedy': inputs[0] is the prompt, decoded for `steps` tokens through
    forward(tokens [1, T], input_pos [1]). kind 'tensors': inputs go through `method` once."""

    name: str
    kind: Literal["greedy", "tensors"]
    method: str
    inputs: tuple[np.ndarray, ...]
    input_names: tuple[str, ...]
    steps: int = 0
    note: str = ""


@dataclass(frozen=True)
class CaseOutput:
    """greedy: ('tokens' int64 [steps], 'logits' float32 [steps, vocab]); tensors: the method's outputs."""

    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...] = field(repr=False)

    def get(self, name: str) -> np.ndarray:
        return self.arrays[self.names.index(name)]


def decode_greedy(call: MethodCall, method: str, prompt: np.ndarray, steps: int,
                  forced: np.ndarray | None = None) -> CaseOutput:
    """Prefill the prompt, then decode one token at a time. With `forced`, feed those tokens
    instead of the argmax (teacher forcing), so two models are compared on the same context."""
    tokens, logits = [], []
    step_input, pos = prompt.astype(np.int64).reshape(1, -1), 0
    for i in range(steps):
        out = np.asarray(call(method, [step_input, np.array([pos], dtype=np.int64)])[0], dtype=np.float32)
        row = out.reshape(-1, out.shape[-1])[-1]
        logits.append(row)
        token = int(forced[i]) if forced is not None else int(row.argmax())
        tokens.append(int(row.argmax()))
        pos += step_input.shape[1]
        step_input = np.array([[token]], dtype=np.int64)
    return CaseOutput(("tokens", "logits"), (np.array(tokens, dtype=np.int64), np.stack(logits)))


def run_case(case: Case, call: MethodCall, forced: CaseOutput | None = None) -> CaseOutput:
    if case.kind == "greedy":
        return decode_greedy(call, case.method, case.inputs[0], case.steps,
                             forced.get("tokens") if forced is not None else None)
    outputs = call(case.method, list(case.inputs))
    arrays = tuple(np.asarray(o) for o in outputs)
    return CaseOutput(tuple(f"output_{i}" for i in range(len(arrays))), arrays)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def row_cosines(expected: np.ndarray, actual: np.ndarray) -> list[float]:
    return [cosine(e, a) for e, a in zip(_rows(expected), _rows(actual))]


def compare(expected: CaseOutput, actual: CaseOutput, *, free_running: bool = True) -> dict:
    """Metrics of `actual` against `expected`: token agreement (greedy) and per-row cosine and max
    abs diff. free_running: both decoded their own tokens, so once the tokens differ the contexts
    differ too and later rows are not comparable: logits are judged up to the first mismatch, and
    the reference's top-2 margin there tells a near-tie from a broken artifact."""
    result: dict = {}
    if "tokens" in expected.names:
        exp_t, act_t = expected.get("tokens"), actual.get("tokens")
        mismatch = np.nonzero(exp_t != act_t)[0]
        result["tokens_match"] = bool(mismatch.size == 0)
        result["first_token_mismatch"] = int(mismatch[0]) if mismatch.size else None
        result["top1_agreement"] = round(float((exp_t == act_t).mean()), 6)
        exp_l, act_l = expected.get("logits"), actual.get("logits")
        if mismatch.size and free_running and exp_l.shape == act_l.shape:
            step = int(mismatch[0])
            margin, noise = _tie_evidence(exp_l, act_l, step, int(exp_t[step]), int(act_t[step]))
            result["reference_margin_at_mismatch"] = round(margin, 6)
            result["noise_at_mismatch"] = round(noise, 6)
            # A near-tie: the reference barely preferred its token, by less than the artifact's
            # numeric noise measured away from the two tokens. The paths diverge from here, so the
            # steps up to it are all that can be compared.
            # (a negative margin: the expected token is not even the reference's own choice)
            result["near_tie"] = 0.0 <= margin <= noise
            result["steps_verified"] = step + 1
            exp_l, act_l = exp_l[:step + 1], act_l[:step + 1]
        pairs = [(exp_l, act_l)]
    else:
        if set(expected.names) != set(actual.names):
            result["shape_mismatch"] = f"expected outputs {list(expected.names)}, got {list(actual.names)}"
            return result
        pairs = [(expected.get(n), actual.get(n)) for n in expected.names]
    cosines, max_abs = [], 0.0
    for exp, act in pairs:
        if exp.shape != act.shape:
            result["shape_mismatch"] = f"expected {list(exp.shape)}, got {list(act.shape)}"
            return result
        cosines += row_cosines(exp, act)
        max_abs = max(max_abs, float(np.abs(exp.astype(np.float64) - act.astype(np.float64)).max(initial=0.0)))
    result["min_cosine"] = round(min(cosines), 6)
    result["mean_cosine"] = round(float(np.mean(cosines)), 6)
    result["max_abs_diff"] = round(max_abs, 6)
    return result


def _tie_evidence(expected: np.ndarray, actual: np.ndarray, step: int, want: int, got: int) -> tuple[float, float]:
    """The reference's margin between its token and the artifact's at `step`, and the artifact's
    noise: its largest logit deviation on the steps before, and at `step` on every other token."""
    margin = float(expected[step, want] - expected[step, got])
    others = np.ones(expected.shape[1], dtype=bool)
    others[[want, got]] = False
    deviation = np.abs(expected[:step + 1].astype(np.float64) - actual[:step + 1].astype(np.float64))
    noise = max(float(deviation[:step].max(initial=0.0)), float(deviation[step, others].max(initial=0.0)))
    return margin, noise


def _rows(array: np.ndarray) -> np.ndarray:
    """One row per token (or per decode step): cosine is judged row by row, never over a whole tensor."""
    return array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)


def within(metrics: dict, tol: Tolerance) -> list[str]:
    """The reasons `metrics` fail `tol`; empty when they pass."""
    reasons = []
    if "shape_mismatch" in metrics:
        reasons.append(f"shape mismatch: {metrics['shape_mismatch']}")
        return reasons
    # A near-tie excuses a flip only from an artifact whose logits otherwise pass the tolerance.
    excused = metrics.get("near_tie") and metrics["min_cosine"] >= tol.min_cosine and (
        tol.max_abs is None or metrics["max_abs_diff"] <= tol.max_abs)
    if metrics.get("tokens_match") is False and not excused:
        margin = metrics.get("reference_margin_at_mismatch")
        reasons.append(f"greedy tokens differ from step {metrics['first_token_mismatch']}"
                       + (f" (the reference preferred its token by {margin}, more than the artifact's noise "
                          f"{metrics['noise_at_mismatch']})" if margin is not None else ""))
    if metrics["min_cosine"] < tol.min_cosine:
        reasons.append(f"cosine {metrics['min_cosine']} < {tol.min_cosine}")
    if tol.max_abs is not None and metrics["max_abs_diff"] > tol.max_abs:
        reasons.append(f"max abs diff {metrics['max_abs_diff']} > {tol.max_abs}")
    return reasons
