"""The coverage matrix shared by tests/e2e/test_coverage.py (which records each cell) and conftest.py
(which, once every worker is done, checks that README.md shows exactly what the cells produced).

Cells run on both xdist workers, so each records its result as a file in one directory that the
controller creates and passes down through the environment."""

from __future__ import annotations

import os
import re
from pathlib import Path

from demo_model.build import DECODER_CONFIGS
from edgepack.exporters.registry import BACKENDS

FAMILIES = tuple(f for f in DECODER_CONFIGS if f != "llama")  # llama: tests/e2e/test_export_llama.py and the demo
RESULTS_ENV = "EDGEPACK_COVERAGE_RESULTS"
MATRIX_START, MATRIX_END = "<!-- coverage-matrix:start -->", "<!-- coverage-matrix:end -->"


def record(family: str, backend: str, mark: str) -> None:
    (Path(os.environ[RESULTS_ENV]) / f"{family}.{backend}").write_text(mark, encoding="utf-8")


def render(results: Path) -> str | None:
    """The README table, or None when some cell did not run in this session (e.g. with -k)."""
    backends = sorted(BACKENDS)
    cells = {(f, b): results / f"{f}.{b}" for f in FAMILIES for b in backends}
    if not all(path.is_file() for path in cells.values()):
        return None
    lines = ["| family | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    for family in FAMILIES:
        lines.append(f"| {family} | " + " | ".join(cells[(family, b)].read_text(encoding="utf-8") for b in backends) + " |")
    return "\n".join(lines)


def readme_problem(readme: Path, results: Path) -> str | None:
    """Why README.md's matrix is not the one these results give; None when it is (or when the
    matrix did not run whole)."""
    matrix = render(results)
    if matrix is None:
        return None
    block = re.search(re.escape(MATRIX_START) + r"\n(.*?)\n" + re.escape(MATRIX_END), readme.read_text(), re.S)
    if not block:
        return f"{readme} has no {MATRIX_START} ... {MATRIX_END} block"
    if block.group(1) != matrix:
        return f"{readme}'s coverage matrix is stale; the tests produced:\n{matrix}"
    return None
