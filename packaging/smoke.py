"""The smoke harness: replay a bundle's golden cases through each artifact on a runtime and
compare with the expected outputs recorded at export, within the manifest's tolerances."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgepack.cases import Case, CaseOutput, Tolerance, compare, run_case, within
from edgepack.errors import EdgepackError, InputError
from edgepack.packaging.runtimes import HOST_RUNTIMES


@dataclass
class BackendSmoke:
    backend: str
    runtime: str
    passed: bool
    cases: dict[str, dict] = field(default_factory=dict)  # case -> metrics (+ "failures")
    error: str | None = None

    def as_dict(self) -> dict:
        return {"runtime": self.runtime, "passed": self.passed, "cases": self.cases, "error": self.error}


def _load(bundle: Path, ref: dict) -> np.ndarray:
    path = bundle / ref["path"]
    if not path.is_file():
        raise InputError(f"{path}: smoke file listed in the manifest is missing")
    return np.load(path, allow_pickle=False)


def _expected(bundle: Path, refs: dict) -> CaseOutput:
    return CaseOutput(tuple(refs), tuple(_load(bundle, r) for r in refs.values()))


def golden_cases(bundle: Path, manifest: dict) -> list[tuple[Case, dict]]:
    """The manifest's smoke cases with their inputs loaded, each with its expected-output references."""
    out = []
    for c in manifest["smoke"]["cases"]:
        inputs = tuple(_load(bundle, i) for i in c["inputs"])
        case = Case(c["name"], c["kind"], c["method"], inputs, tuple(i["name"] for i in c["inputs"]), c["steps"])
        out.append((case, c["expected"]))
    return out


# replay(bundle, artifact) -> run(case) -> the artifact's outputs for that case
Replay = Callable[[Path, dict], Callable[[Case], CaseOutput]]


def host_replay(bundle: Path, artifact: dict) -> Callable[[Case], CaseOutput]:
    """The artifact on its runtime in this process (the host's, or the emulated arm64 Python's)."""
    call = HOST_RUNTIMES[artifact["backend"]](bundle / artifact["path"], artifact)
    return lambda case: run_case(case, call)


def smoke_bundle(bundle: Path, manifest: dict, backends: list[str] | None = None,
                 replay: Replay = host_replay, where: str = "host") -> list[BackendSmoke]:
    """Run every artifact (or those named) through `replay` (default: its host runtime) and judge
    its outputs. A failure of one backend is recorded in its result, never raised, so the others
    still run."""
    tolerance = Tolerance(manifest["smoke"]["tolerance"]["min_cosine"], manifest["smoke"]["tolerance"]["max_abs"])
    cases = golden_cases(bundle, manifest)
    results = []
    for artifact in manifest["artifacts"]:
        backend = artifact["backend"]
        if backends and backend not in backends:
            continue
        result = BackendSmoke(backend, f"{backend} {where}", passed=True)
        try:
            run = replay(bundle, artifact)
            for case, expected_refs in cases:
                actual = run(case)
                metrics = compare(_expected(bundle, expected_refs[backend]), actual)
                reasons = within(metrics, tolerance)
                # End to end, for the record (not gated): the artifact against the fp32 model.
                vs_fp32 = compare(_expected(bundle, expected_refs["fp32-eager"]), actual)
                result.cases[case.name] = {**metrics, "failures": reasons, "vs_fp32": vs_fp32}
                result.passed &= not reasons
        except EdgepackError as e:
            result.passed, result.error = False, str(e)
        except Exception as e:  # a runtime that cannot load or run the artifact is a smoke failure
            result.passed, result.error = False, f"{type(e).__name__}: {e}"
        results.append(result)
    return results
