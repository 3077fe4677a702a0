"""Shared fixtures: tiny real models built on the fly (no downloads) and bundles exported once
per session through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepack.cli import app
from edgepack.demo import build_bert_dir, build_llama_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


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
