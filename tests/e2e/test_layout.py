"""DESIGN.md: top-level exporters/ and packaging/ import as edgepack.*, and `import packaging`
never resolves to ours, from the repository root included. The mapping is on disk (two committed
symlinks, edgepack/exporters and edgepack/packaging, and pyproject's package-dir for wheels), not
code that runs at import."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT, run_python


def test_pytest_collects_from_the_repository_root():
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/unit/test_layout_rules.py"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_imports_from_the_repository_root" in result.stdout


def test_help_is_fast_and_teaches():
    # --help must not import torch or a converter
    out = run_python("import sys; from edgepack.cli import app; print('torch' in sys.modules)")
    assert out.strip() == "False"
    for command in ("export", "smoke", "inspect", "doctor"):
        result = subprocess.run([sys.executable, "-m", "edgepack", command, "--help"], cwd=REPO_ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 0 and "Example" in result.stdout, command
        if command == "export":  # where a large model's export needs room, before it is refused for it
            assert "Large models" in result.stdout and "TMPDIR" in result.stdout


def test_doctor_lists_backends_with_versions():
    result = subprocess.run([sys.executable, "-m", "edgepack", "doctor", "--json"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    import json

    report = json.loads(result.stdout)
    assert report["backends"]["executorch"]["available"]
    assert report["backends"]["executorch"]["distributions"]["executorch"] == "1.5.1"
    assert report["core"]["torch"].startswith("2.13.0")


# GGUF is also a source format: the front end reads .gguf files (source kind "gguf") with
# transformers' loader, whatever the targets.
