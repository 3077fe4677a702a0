"""The .litertlm on the LiteRT-LM engine (litert-lm-api: the C++ engine Android apps embed for
.litertlm bundles, through its Python binding): each golden greedy case decoded by the engine
itself, from the prompt's text to its answer's text, with the bundle's own tokenizer, start
token, stop tokens and prefill/decode signatures.

The engine's API takes and returns text and gives no logits (its text scoring returned
log-probabilities far from the greedy path it decodes, on the demo model), so the check is the
greedy path, token for token: the engine's answer, tokenized by the engine's tokenizer, must be
the reference's tokens; where the engine stops early, the reference's next token must be a stop
token. The start and stop tokens the engine reads from the bundle must be the tokenizer's. It runs the same .tflite as the interpreter's teacher-forced smoke, which checks the
logits; this checks what the engine adds. Free-running: where the engine parts from the reference
at a near-tie, it is given the reference's token (as text) and decodes on from there."""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgepack.cases import Case, CaseOutput
from edgepack.errors import RuntimeUnavailableError


def _engine(path: Path, cache_dir: Path):
    try:
        import litert_lm
        from litert_lm import interfaces
    except ImportError as e:
        raise RuntimeUnavailableError("the LiteRT-LM engine is not installed",
                                      hint="pip install 'edgepack[tflite]' (litert-lm-api, x86_64 Linux)") from e
    # Its INFO/WARNING lines (missing optional sections, accelerator registry) would reach the
    # user's terminal from native code; errors still do.
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    # The engine writes its compiled XNNPACK weights cache beside the model unless told otherwise.
    return litert_lm.Engine(str(path), backend=interfaces.Backend.CPU(), cache_dir=str(cache_dir)), interfaces


def check_on_engine(bundle: Path, manifest: dict, artifact: dict, cases: list[tuple[Case, CaseOutput]],
                    interpreter: dict[str, dict]) -> dict[str, dict]:
    """The bundle's .litertlm on the engine (a CompanionCheck's run): its greedy cases, judged
    against the .tflite's expected outputs, with the interpreter's smoke of the same .tflite
    (`interpreter`: case -> metrics) lending its measured noise to the near-tie rule."""
    greedy = [(case, expected, interpreter_noise(interpreter.get(case.name, {})))
              for case, expected in cases if case.kind == "greedy"]
    with tempfile.TemporaryDirectory(prefix="edgepack-litertlm-") as cache:  # the engine's weight cache
        tok = manifest["tokenizer"]
        return greedy_on_engine(bundle / artifact["runtime"]["litertlm"], greedy, tok["bos_id"], tok["eos_ids"],
                                Path(cache))


def interpreter_noise(metrics: dict) -> float | None:
    """The interpreter's measured logit deviation on a case, lent to the near-tie rule only when
    that case passed there: a failed case's deviation measures a fault, not noise."""
    return None if metrics.get("failures", True) else metrics.get("max_abs_diff")


def greedy_on_engine(path: Path, cases: list[tuple[Case, CaseOutput, float | None]], bos_id: int | None,
                     stop_ids: list[int], cache_dir: Path) -> dict[str, dict]:
    """Per greedy case (with the reference's tokens and logits, and the numeric noise the LiteRT
    interpreter showed on the same .tflite, or None): what the engine decoded, and why it fails.
    `bos_id` and `stop_ids` are the tokenizer's (the manifest's): the engine must use the same."""
    engine, interfaces = _engine(path, cache_dir)
    try:
        wrong = _wrong_special_tokens(engine, bos_id, stop_ids)
        return {case.name: _judge(engine, interfaces, case, expected, noise, stop_ids, wrong)
                for case, expected, noise in cases}
    finally:
        engine.close()


def _near_tie(expected: CaseOutput, step: int, want: int, got: int, noise: float | None) -> dict | None:
    """Where the engine parts from the reference, was the reference's choice within the .tflite's
    own numeric noise? The engine gives no logits, so its noise is the one the interpreter measured
    on the same file and case (its largest logit deviation from the reference, teacher-forced); the
    paths part at a near-tie just as the host smoke's near-tie rule allows."""
    logits = expected.get("logits")
    logits = logits.reshape(-1, logits.shape[-1])
    if noise is None or step >= len(logits) or got >= logits.shape[1]:
        return None
    margin = float(logits[step, want] - logits[step, got])
    if margin > noise:
        return None
    return {"step": step, "reference_margin": round(margin, 4), "noise": round(noise, 4),
            "noise_from": "the LiteRT interpreter's largest logit deviation from the reference on this .tflite"}


def _wrong_special_tokens(engine, bos_id: int | None, stop_ids: list[int]) -> list[str]:
    """The start and stop tokens the engine read from the bundle, against the tokenizer's: a
    wrong one changes every prompt, or never ends an answer, on a device too."""
    wrong = []
    if engine.bos_token_id != bos_id:
        wrong.append(f"the engine prepends start token {engine.bos_token_id}, the tokenizer's BOS is {bos_id}")
    engine_stops = sorted(i for ids in engine.eos_token_ids for i in ids)
    if engine_stops != sorted(stop_ids):
        wrong.append(f"the engine stops on {engine_stops}, the tokenizer's eos ids are {sorted(stop_ids)}")
    return wrong


def _judge(engine, interfaces, case: Case, expected: CaseOutput, noise: float | None, stop_ids: list[int],
           wrong: list[str]) -> dict:
    """The engine's greedy answer against the reference's tokens. Where it parts from them at a
    near-tie, the check goes on: the engine is given the prompt and the reference's tokens up to and
    including the tied step (as text: it takes no ids) and decodes again from there, so a tie at
    the first step does not leave the other steps unchecked."""
    prompt = [int(t) for t in case.inputs[0].reshape(-1)]
    want = [int(t) for t in expected.get("tokens").reshape(-1)]
    metrics: dict = {"steps": case.steps, "steps_matched": 0, "near_ties": []}
    failures = list(wrong)
    # The engine prepends its start token to the prompt text itself.
    if engine.bos_token_id is not None and prompt[:1] == [engine.bos_token_id]:
        prompt = prompt[1:]
    start = 0
    while True:
        ids = prompt + want[:start]
        text = engine.detokenize(ids)
        if engine.tokenize(text) != ids:
            if start == 0:
                failures.append("the prompt's text does not tokenize back to the prompt's ids with the engine's "
                                "tokenizer, so the engine cannot be given the same input")
            else:  # BPE merges the prompt's end with the tied token: the rest cannot be given as text
                metrics["unchecked_from"] = start
            break
        answer = _greedy_answer(engine, interfaces, text, len(want) - start)
        ahead = want[start:]
        matched = steps_matched(engine.detokenize, ahead, answer)
        if start == 0:  # no speeds here: this lands in the manifest, whose bytes must not depend on the run
            metrics["tokens"] = engine.tokenize(answer) if answer else []
        metrics["steps_matched"] += matched
        step, rest = start + matched, answer[len(engine.detokenize(ahead[:matched])):]
        if rest and matched < len(ahead):  # the engine went on with text the reference's next token does not give
            parted = engine.tokenize(rest)[0]
            tie = _near_tie(expected, step, want[step], parted, noise)
            if tie is None:
                failures.append(f"the engine's greedy token {parted} at step {step} is not the reference's {want[step]}")
                break
            metrics["near_ties"].append(tie)
            start = step + 1
            if start < len(want):
                continue
        elif not rest and matched < len(ahead) and ahead[matched] not in stop_ids:
            failures.append(f"the engine stopped after {step} tokens, where the reference's next token "
                            f"{want[step]} is not a stop token {stop_ids}")
        break
    metrics["failures"] = failures
    return metrics


def _greedy_answer(engine, interfaces, text: str, steps: int) -> str:
    session = engine.create_session(apply_prompt_template=False, max_output_tokens=steps,
                                    sampler_config=interfaces.SamplerConfig(top_k=1, top_p=1.0, temperature=1.0, seed=0))
    try:
        session.run_prefill([text])
        return session.run_decode().texts[0]
    finally:
        session.close()


def steps_matched(detokenize, want: list[int], answer: str) -> int:
    """How many of the reference's greedy tokens the engine's answer begins with, compared as text:
    the engine answers in text, and re-tokenizing it can merge two tokens it generated into one
    (BPE), so the answer's own tokens are not the steps it took. A prefix that ends inside a
    character decodes to a replacement character, so every prefix is tried, not just up to the
    first that differs."""
    return max(k for k in range(len(want) + 1) if answer.startswith(detokenize(want[:k])))


def describe(fid: dict) -> str:
    """The .litertlm's free-running greedy check on the engine, in a line (a CompanionCheck's describe)."""
    if fid.get("error"):
        return f"[red]FAIL[/]: {fid['error']}"
    parts = ["[green]pass[/]" if fid.get("passed") else "[red]FAIL[/]"]
    for name, m in fid.get("cases", {}).items():
        if "steps_matched" in m:
            parts.append(f"{name}: {m['steps_matched']} of {m['steps']} greedy tokens (free-running)")
        ties = m.get("near_ties", [])
        if ties:
            margins = sorted(t["reference_margin"] for t in ties)
            parts.append(f"near-ties at step {', '.join(str(t['step']) for t in ties)} (the reference preferred its "
                         f"token by {margins[0]:.3f}" + (f" to {margins[-1]:.3f}" if len(ties) > 1 else "")
                         + f", within the .tflite's noise {ties[0]['noise']:.3f}; each resumed from the reference's token)")
        if "unchecked_from" in m:
            parts.append(f"steps from {m['unchecked_from']} unchecked (the prompt and the reference's tokens "
                         "do not tokenize back to themselves as text)")
    failures = [f for m in fid.get("cases", {}).values() for f in m.get("failures", [])]
    return ", ".join(parts) + ("; " + "; ".join(failures[:3]) if failures else "")
