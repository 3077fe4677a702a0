"""The smoke harness: replay a bundle's golden cases through each artifact on a runtime and
compare with the expected outputs recorded at export, within the manifest's tolerances."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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


def _cases(bundle: Path, manifest: dict) -> list[tuple[Case, dict]]:
    out = []
    for c in manifest["smoke"]["cases"]:
        inputs = tuple(_load(bundle, i) for i in c["inputs"])
        case = Case(c["name"], c["kind"], c["method"], inputs, tuple(i["name"] for i in c["inputs"]), c["steps"])
        out.append((case, c["expected"]))
    return out


def smoke_bundle(bundle: Path, manifest: dict, backends: list[str] | None = None) -> list[BackendSmoke]:
    """Run every artifact (or those named) on its host runtime. A failure of one backend is
    recorded in its result, never raised, so the others still run."""
    tolerance = Tolerance(manifest["smoke"]["tolerance"]["min_cosine"], manifest["smoke"]["tolerance"]["max_abs"])
    cases = _cases(bundle, manifest)
    results = []
    for artifact in manifest["artifacts"]:
        backend = artifact["backend"]
        if backends and backend not in backends:
            continue
        result = BackendSmoke(backend, f"{backend} host", passed=True)
        try:
            call = HOST_RUNTIMES[backend](bundle / artifact["path"], artifact)
            for case, expected_refs in cases:
                refs = expected_refs[backend]
                expected = CaseOutput(tuple(refs), tuple(_load(bundle, r) for r in refs.values()))
                metrics = compare(expected, run_case(case, call))
                reasons = within(metrics, tolerance)
                result.cases[case.name] = {**metrics, "failures": reasons}
                result.passed &= not reasons
        except EdgepackError as e:
            result.passed, result.error = False, str(e)
        except Exception as e:  # a runtime that cannot load or run the artifact is a smoke failure
            result.passed, result.error = False, f"{type(e).__name__}: {e}"
        results.append(result)
    return results
