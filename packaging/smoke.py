"""The smoke harness: replay a bundle's golden cases through each artifact on a runtime and
compare with the expected outputs recorded at export, within the manifest's tolerances."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgepack.cases import Case, CaseOutput, Tolerance, compare, judge_greedy, run_case, within
from edgepack.errors import EdgepackError, InputError
from edgepack.exporters.backend import CompanionCheck, function
from edgepack.exporters.registry import BACKENDS
from edgepack.rss import measure_rss


@dataclass
class BackendSmoke:
    backend: str
    runtime: str
    passed: bool
    cases: dict[str, dict] = field(default_factory=dict)  # case -> metrics (+ "failures")
    error: str | None = None
    # measured on the host while its runtime loaded and ran the artifact in this process: the
    # resident set before and the peak during (empty where not measurable: not Linux, not the
    # host). Reported by export and smoke, never written to the manifest: a bundle stays the same
    # bytes from run to run.
    memory: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"runtime": self.runtime, "passed": self.passed, "cases": self.cases, "error": self.error}


def _load(bundle: Path, ref: dict) -> np.ndarray:
    path = bundle / ref["path"]
    if not path.is_file():
        raise InputError(f"{path}: smoke file listed in the manifest is missing")
    return np.load(path, allow_pickle=False)


def expected_output(bundle: Path, refs: dict) -> CaseOutput:
    return CaseOutput(tuple(refs), tuple(_load(bundle, r) for r in refs.values()))


def golden_cases(bundle: Path, manifest: dict) -> list[tuple[Case, dict]]:
    """The manifest's smoke cases with their inputs loaded, each with its expected-output references."""
    out = []
    for c in manifest["smoke"]["cases"]:
        inputs = tuple(_load(bundle, i) for i in c["inputs"])
        case = Case(c["name"], c["kind"], c["method"], inputs, tuple(i["name"] for i in c["inputs"]), c["steps"])
        out.append((case, c["expected"]))
    return out


# replay(bundle, artifact) -> run(case, forced) -> the artifact's outputs for that case, fed
# `forced`'s tokens (teacher forcing) when given, free-running otherwise
Replay = Callable[[Path, dict], Callable[[Case, CaseOutput | None], CaseOutput]]


def host_replay(bundle: Path, artifact: dict) -> Callable[[Case, CaseOutput | None], CaseOutput]:
    """The artifact on its runtime in this process (the host's, or the emulated arm64 Python's)."""
    call = BACKENDS[artifact["backend"]].host_call(bundle / artifact["path"], artifact)
    return lambda case, forced=None: run_case(case, call, forced)


def judge_case(case: Case, run: Callable[[Case, CaseOutput | None], CaseOutput], expected: CaseOutput,
               fp32: CaseOutput, tolerance: Tolerance) -> dict:
    """One golden case through an artifact: greedy cases teacher-forced on the reference's tokens
    (gated, every step), then free-running (recorded: where the greedy paths part); other cases
    once, also compared with fp32 (recorded)."""
    if case.kind == "greedy":
        return judge_greedy(run, case, expected, tolerance)
    actual = run(case, None)
    metrics = compare(expected, actual)
    metrics["vs_fp32"] = compare(fp32, actual)
    return {**metrics, "failures": within(metrics, tolerance)}


def smoke_bundle(bundle: Path, manifest: dict, backends: list[str] | None = None,
                 replay: Replay = host_replay, where: str = "host") -> list[BackendSmoke]:
    """Run every artifact (or those named) through `replay` (default: its host runtime) and judge
    its outputs. A failure of one backend is recorded in its result, never raised, so the others
    still run."""
    cases = golden_cases(bundle, manifest)
    results = []
    for artifact in manifest["artifacts"]:
        backend = artifact["backend"]
        if backends and backend not in backends:
            continue
        result = BackendSmoke(backend, f"{backend} {where}", passed=True)
        tolerance = Tolerance.from_dict(artifact["smoke_tolerance"])
        try:
            with measure_rss() if where == "host" else nullcontext({}) as result.memory:
                run = replay(bundle, artifact)
                for case, refs in cases:
                    result.cases[case.name] = judge_case(case, run, expected_output(bundle, refs[backend]),
                                                         expected_output(bundle, refs["fp32-eager"]), tolerance)
                    result.passed &= not result.cases[case.name]["failures"]
        except Exception as e:  # a runtime that cannot load or run the artifact is a smoke failure
            result.passed, result.error = False, _error_text(e)
        results.append(result)
        if where == "host":
            results += [companion_smoke(check, bundle, manifest, artifact, cases, result)
                        for check in BACKENDS[backend].companions if artifact["runtime"].get(check.file_key)]
    return results


def companion_smoke(check: CompanionCheck, bundle: Path, manifest: dict, artifact: dict,
                    cases: list[tuple[Case, dict]], host_row: BackendSmoke) -> BackendSmoke:
    """A file written beside the artifact, on its own runtime (e.g. the .litertlm on the LiteRT-LM
    engine), as a row of its own. `host_row` is the artifact's row: what its runtime measured."""
    result = BackendSmoke(check.name, check.runtime, passed=True)
    expected = [(case, expected_output(bundle, refs[artifact["backend"]])) for case, refs in cases]
    try:
        result.cases = function(check.run)(bundle, manifest, artifact, expected, host_row.cases)
        result.passed = all(not m["failures"] for m in result.cases.values())
    except Exception as e:  # noqa: BLE001 - the runtime failing to load or run the file is its verdict
        result.passed, result.error = False, _error_text(e)
    return result


def _error_text(e: Exception) -> str:
    """A failure as a result row says it: edgepack's own errors as written, others with their type."""
    return str(e) if isinstance(e, EdgepackError) else f"{type(e).__name__}: {e}"
