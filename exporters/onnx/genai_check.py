"""The ONNX decoder on onnxruntime-genai's generator, the loop ONNX Runtime's LLM apps run (a
CompanionCheck): the onnx/ folder loaded by its genai_config.json as written, the KV cache kept
as genai keeps it (one shared buffer), each greedy case judged as the smoke judges the artifact on
plain ONNX Runtime: fed the reference's tokens, every step's logits within the artifact's
tolerance of the reference's and its top-1 the same (near-ties aside); then free-running.
A config genai cannot load, a wrong I/O name or a cache it fills wrongly fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgepack.cases import Case, CaseOutput, MethodCall, Tolerance, judge_greedy, run_case
from edgepack.errors import RuntimeUnavailableError


def _model(folder: Path):
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise RuntimeUnavailableError("onnxruntime-genai is not installed", hint="pip install 'edgepack[onnx]'") from e
    return og, og.Model(str(folder))


def generator_call(og, model, max_length: int) -> MethodCall:
    """forward(tokens [1, T], input_pos [1]) on genai's generator for `model`: position 0 starts a
    new one, later calls append their tokens to it; the logits of the last token appended."""
    state: dict = {}

    def call(_: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        tokens, position = inputs
        if int(position[0]) == 0:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=max_length, do_sample=False)
            state["generator"] = og.Generator(model, params)
        state["generator"].append_tokens(np.asarray(tokens, dtype=np.int32).reshape(-1))
        return [state["generator"].get_logits()]

    return call


def check_on_genai(bundle: Path, manifest: dict, artifact: dict, cases: list[tuple[Case, CaseOutput]],
                   host_cases: dict[str, dict]) -> dict[str, dict]:
    """Each greedy case through genai (the folder loaded once), against the artifact's expected
    outputs and tolerance."""
    og, model = _model((bundle / artifact["runtime"]["genai_config"]).parent)
    tolerance = Tolerance.from_dict(artifact["smoke_tolerance"])
    results = {}
    for case, expected in cases:
        if case.kind == "greedy":
            call = generator_call(og, model, case.inputs[0].size + case.steps)
            results[case.name] = judge_greedy(lambda c, forced: run_case(c, call, forced), case, expected, tolerance)
    return results
