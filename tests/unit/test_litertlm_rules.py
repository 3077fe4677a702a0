"""The LiteRT-LM engine check's rules on made-up answers: steps counted on the engine's text,
near-tie excuses only within the .tflite's own noise, noise borrowed only from a passing case."""

from __future__ import annotations


def test_the_engine_is_excused_only_at_a_near_tie_within_the_tflites_noise():
    """The engine gives no logits: where its greedy path parts from the reference's, the parting is
    excused only if the reference preferred its token by no more than the noise the interpreter
    measured on the same .tflite (the SmolLM2-135M case: margin 1.46 at a step whose top three
    lie within 0.03, interpreter noise 2.91)."""
    import numpy as np

    from edgepack.cases import CaseOutput
    from edgepack.exporters.tflite.litertlm_engine import _near_tie

    logits = np.zeros((4, 10), np.float32)
    logits[3, 7], logits[3, 2] = 26.35, 24.89
    expected = CaseOutput(("tokens", "logits"), (np.array([[1, 1, 1, 7]]), logits[None]))
    tie = _near_tie(expected, 3, 7, 2, noise=2.91)
    assert tie and tie["step"] == 3 and tie["reference_margin"] == 1.46 and tie["noise"] == 2.91
    assert _near_tie(expected, 3, 7, 2, noise=1.0) is None  # decisive beyond the file's noise: a failure
    assert _near_tie(expected, 3, 7, 2, noise=None) is None  # no interpreter measurement: strict


def test_the_engines_steps_are_counted_on_its_text_not_its_retokenized_tokens():
    """The engine answers in text: a BPE tokenizer can merge two generated tokens into one when the
    text is tokenized again ("a" + "b" -> "ab"), which is not a different answer."""
    from edgepack.exporters.tflite.litertlm_engine import steps_matched

    pieces = {1: "a", 2: "b", 3: "\xe2", 4: "\x82\xac", 5: "c"}  # 3 + 4: one character in two tokens

    def detokenize(ids):
        return "".join(pieces[i] for i in ids).encode("latin-1").decode("utf-8", errors="replace")

    assert steps_matched(detokenize, [1, 2, 3, 4, 5], "ab€c") == 5
    assert steps_matched(detokenize, [1, 2, 3, 4, 5], "ab€") == 4  # stopped early
    assert steps_matched(detokenize, [1, 2, 5], "abd") == 2  # parted at step 2
    assert steps_matched(detokenize, [1, 2], "") == 0


def test_the_engine_borrows_noise_only_from_a_case_the_interpreter_passed():
    """A failed interpreter case's deviation measures a fault in the .tflite, not noise: lending it
    to the engine's near-tie rule would let the engine's row pass on a broken file."""
    from edgepack.exporters.tflite.litertlm_engine import interpreter_noise

    assert interpreter_noise({"max_abs_diff": 2.91, "failures": []}) == 2.91
    assert interpreter_noise({"max_abs_diff": 40.0, "failures": ["logits max_abs_diff 40.0 > 3.0"]}) is None
    assert interpreter_noise({}) is None  # the interpreter never ran the case



class _ScriptedEngine:
    """The engine's text interface over one character a token (id = ord), answering each prompt
    from a script: the judging rules on made-up answers, not the engine (tests/e2e/test_tflite.py
    runs the real one)."""

    bos_token_id = None

    def __init__(self, answers: dict[str, str]):
        self.answers, self.prompts = answers, []

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))

    def create_session(self, max_output_tokens: int, **_):
        engine = self

        class Session:
            def run_prefill(self, texts):
                engine.prompts.append(texts[0])
                self.answer = engine.answers[texts[0]][:max_output_tokens]

            def run_decode(self):
                return type("Responses", (), {"texts": [self.answer]})

            def close(self):
                pass

        return Session()


def _judged(answers: dict[str, str], want: str, tied: dict[int, str], noise: float | None = 1.0):
    """_judge on prompt "p" and the reference's greedy answer `want`, whose logits favour its own
    token at every step by 5.0 except at the steps in `tied`, where the given token is 0.5 behind."""
    import numpy as np

    from edgepack.cases import Case, CaseOutput
    from edgepack.exporters.tflite.litertlm_engine import _judge

    logits = np.zeros((len(want), 128), np.float32)
    for step, c in enumerate(want):
        logits[step, ord(c)] = 5.0
    for step, c in tied.items():
        logits[step, ord(c)] = 4.5
    engine = _ScriptedEngine(answers)
    case = Case(name="greedy", kind="greedy", method="forward", inputs=(np.array([[ord("p")]]),), input_names=("tokens",),
                steps=len(want))
    expected = CaseOutput(("tokens", "logits"), (np.array([[ord(c) for c in want]]), logits[None]))
    interfaces = type("Interfaces", (), {"SamplerConfig": lambda **_: None})
    return _judge(engine, interfaces, case, expected, noise, stop_ids=[0], wrong=[]), engine.prompts


def test_the_engine_check_resumes_after_a_near_tie_from_the_references_token():
    """A near-tie at the first step used to end the comparison with 0 steps checked (the real
    SmolLM2-135M's .litertlm, 2026-12-06): the engine is now given the reference's token and goes on,
    and a later parting beyond the noise fails."""
    metrics, prompts = _judged({"p": "xbcd", "pa": "bcd"}, "abcd", tied={0: "x"})
    assert prompts == ["p", "pa"] and metrics["failures"] == []
    assert metrics["steps_matched"] == 3 and [t["step"] for t in metrics["near_ties"]] == [0]
    from edgepack.exporters.tflite.litertlm_engine import describe

    assert "3 of 4 greedy tokens (free-running), near-ties at step 0 (the reference preferred its token by 0.500" in \
        describe({"passed": True, "cases": {"greedy": metrics}})

    metrics, _ = _judged({"p": "xbcd", "pa": "bzd"}, "abcd", tied={0: "x"})  # z at step 2: not tied
    assert metrics["steps_matched"] == 1 and metrics["failures"] == [
        "the engine's greedy token 122 at step 2 is not the reference's 99"]

    metrics, prompts = _judged({"p": "xbcd"}, "abcd", tied={0: "x"}, noise=None)  # no noise measured: strict
    assert prompts == ["p"] and metrics["steps_matched"] == 0 and len(metrics["failures"]) == 1

    metrics, prompts = _judged({"p": "abcd"}, "abcd", tied={})
    assert prompts == ["p"] and metrics["steps_matched"] == 4 and metrics["failures"] == metrics["near_ties"] == []
