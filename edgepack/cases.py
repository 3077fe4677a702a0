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
    """How close an artifact must be to its reference: every row's cosine (and max abs diff, when
    set); for greedy cases every step's top-1, near-ties aside (see compare)."""

    min_cosine: float
    max_abs: float | None = None
    # The reference's min cosine against itself with its linear inputs nudged (capture.NUDGE):
    # what loosened min_cosine below the default, when it did.
    nudged_cosine: float | None = None

    def as_dict(self) -> dict:
        return {"min_cosine": self.min_cosine, "max_abs": self.max_abs, "nudged_cosine": self.nudged_cosine,
                "tokens": "teacher-forced: every step's top-1 must match the reference's, near-ties excused"}

    @classmethod
    def from_dict(cls, d: dict) -> "Tolerance":
        return cls(d["min_cosine"], d["max_abs"], d.get("nudged_cosine"))


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


def compare(expected: CaseOutput, actual: CaseOutput) -> dict:
    """Metrics of `actual` against `expected`, row by row (a decode step, or a token).

    Greedy cases are compared teacher-forced: `actual` was fed `expected`'s tokens, so every step
    has the same context and every step is judged (steps_verified == steps). A step whose top-1
    differs is a near-tie when the reference preferred its token over the artifact's by no more
    than the artifact's own numeric noise, measured on the steps whose top-1 agrees (its largest
    logit deviation there): a step that is wrong cannot lend itself, or another wrong step, the
    noise that would excuse it. A non-finite output is counted and fails."""
    result: dict = {}
    if "tokens" in expected.names:
        exp_l, act_l = expected.get("logits"), actual.get("logits")
        if exp_l.shape != act_l.shape:
            return {"shape_mismatch": f"expected logits {list(exp_l.shape)}, got {list(act_l.shape)}"}
        exp_t, act_t = exp_l.argmax(-1), act_l.argmax(-1)
        differ = np.nonzero(exp_t != act_t)[0]
        result["steps"] = result["steps_verified"] = int(exp_t.size)
        result["tokens_match"] = bool(differ.size == 0)
        result["top1_agreement"] = round(float((exp_t == act_t).mean()), 6)
        if differ.size:
            agree = exp_t == act_t
            result["top1_mismatches"] = [_tie_evidence(exp_l, act_l, int(step), agree) for step in differ]
            result["near_tie_steps"] = [m["step"] for m in result["top1_mismatches"] if m["near_tie"]]
        pairs = [(exp_l, act_l)]
    else:
        if set(expected.names) != set(actual.names):
            return {"shape_mismatch": f"expected outputs {list(expected.names)}, got {list(actual.names)}"}
        pairs = [(expected.get(n), actual.get(n)) for n in expected.names]
    cosines, max_abs, non_finite = [], 0.0, 0
    for exp, act in pairs:
        if exp.shape != act.shape:
            return {**result, "shape_mismatch": f"expected {list(exp.shape)}, got {list(act.shape)}"}
        finite = np.isfinite(act)
        non_finite += int((~finite).sum())
        act = np.where(finite, act, 0.0)
        cosines += row_cosines(exp, act)
        max_abs = max(max_abs, float(np.abs(exp.astype(np.float64) - act.astype(np.float64)).max(initial=0.0)))
    result["min_cosine"] = round(min(cosines), 6)
    result["mean_cosine"] = round(float(np.mean(cosines)), 6)
    result["max_abs_diff"] = round(max_abs, 6)
    if non_finite:
        result["non_finite"] = non_finite
    return result


def compare_free_running(expected: CaseOutput, actual: CaseOutput) -> dict:
    """Both decoded their own greedy tokens: where they first part (information: after that the
    contexts differ, so nothing later is comparable)."""
    exp_t, act_t = expected.get("tokens"), actual.get("tokens")
    differ = np.nonzero(exp_t[:act_t.size] != act_t[:exp_t.size])[0]
    return {"tokens_match": bool(differ.size == 0 and exp_t.size == act_t.size),
            "first_token_mismatch": int(differ[0]) if differ.size else None}


def _tie_evidence(expected: np.ndarray, actual: np.ndarray, step: int, agree: np.ndarray) -> dict:
    """At a step where the top-1 differs: the reference's margin between its token and the
    artifact's, and the artifact's noise (its largest logit deviation on the steps whose top-1
    agrees; none when no step does)."""
    want, got = int(expected[step].argmax()), int(actual[step].argmax())
    margin = float(expected[step, want] - expected[step, got])
    deviation = np.abs(expected[agree].astype(np.float64) - actual[agree].astype(np.float64))
    noise = float(np.nan_to_num(deviation, nan=np.inf).max(initial=0.0))
    return {"step": step, "reference_margin": round(margin, 6), "noise": round(noise, 6), "near_tie": margin <= noise}


def _rows(array: np.ndarray) -> np.ndarray:
    """One row per token (or per decode step): cosine is judged row by row, never over a whole tensor."""
    return array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)


def judge_greedy(run: Callable[[Case, CaseOutput | None], CaseOutput], case: Case, expected: CaseOutput,
                 tolerance: Tolerance) -> dict:
    """A greedy case through an artifact (`run(case, forced)`): teacher-forced on the reference's
    tokens (gated, every step), then free-running (recorded: where the greedy paths part)."""
    metrics = compare(expected, run(case, expected))
    metrics["free_running"] = compare_free_running(expected, run(case, None))
    return {**metrics, "failures": within(metrics, tolerance)}


def within(metrics: dict, tol: Tolerance) -> list[str]:
    """The reasons `metrics` fail `tol`; empty when they pass."""
    if "shape_mismatch" in metrics:
        return [f"shape mismatch: {metrics['shape_mismatch']}"]
    reasons = []
    if metrics.get("non_finite"):
        reasons.append(f"{metrics['non_finite']} non-finite output value(s) (NaN or infinity)")
    for m in metrics.get("top1_mismatches", []):
        if not m["near_tie"]:
            reasons.append(f"top-1 differs at step {m['step']} (the reference preferred its token by "
                           f"{m['reference_margin']}, more than the artifact's noise {m['noise']})")
    if metrics["min_cosine"] < tol.min_cosine:
        reasons.append(f"cosine {metrics['min_cosine']} < {tol.min_cosine}")
    if tol.max_abs is not None and metrics["max_abs_diff"] > tol.max_abs:
        reasons.append(f"max abs diff {metrics['max_abs_diff']} > {tol.max_abs}")
    return reasons
