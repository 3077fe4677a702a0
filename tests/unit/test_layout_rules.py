"""The layout's rules, read from the tree: imports resolve from the repository root to the files on
disk (no code run at import), nothing outside a backend's folder and the registry names a backend,
and the README matrix check catches a stale table."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REPO_ROOT, run_python


def test_imports_from_the_repository_root():
    out = run_python("import edgepack, torch, transformers, packaging, edgepack.packaging.manifest as m, "
                  "edgepack.exporters.sources as s; print(packaging.__file__); print(m.__file__); print(s.__file__)")
    pypi_packaging, manifest, sources = out.splitlines()
    assert "site-packages" in pypi_packaging
    assert Path(manifest).resolve() == REPO_ROOT / "packaging" / "manifest.py"
    assert Path(sources).resolve() == REPO_ROOT / "exporters" / "sources.py"


def test_the_mapping_is_on_disk_not_code_run_at_import():
    for name in ("exporters", "packaging"):
        link = REPO_ROOT / "edgepack" / name
        assert link.is_symlink() and link.resolve() == REPO_ROOT / name
        assert not (REPO_ROOT / name / "__init__.py").exists()  # a regular `packaging` would shadow PyPI's
    init = (REPO_ROOT / "edgepack" / "__init__.py").read_text()
    assert "import" not in init.split('"""')[-1], init  # nothing but the version after the docstring


def test_readme_matrix_check_catches_a_stale_table(tmp_path):
    from edgepack.exporters.registry import BACKENDS
    from tests.coverage_matrix import FAMILIES, MATRIX_END, MATRIX_START, readme_problem, render

    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("no table here\n")
    assert readme_problem(readme, results) is None  # the matrix did not run whole: nothing to check
    for family in FAMILIES:
        for backend in BACKENDS:
            (results / f"{family}.{backend}").write_text("✓")
    assert "has no" in readme_problem(readme, results)
    readme.write_text(f"{MATRIX_START}\n{render(results)}\n{MATRIX_END}\n")
    assert readme_problem(readme, results) is None
    (results / f"{FAMILIES[0]}.{sorted(BACKENDS)[0]}").write_text("✗")
    assert "stale" in readme_problem(readme, results)


def _not_a_backend(text: str) -> str:
    """A module path, or torch's ONNX exporter (its trace records, `pkg.torch.onnx.*`, that the
    shared exporters/onnx_capture.py reads for every backend starting from ONNX), names no backend."""
    return text.replace("edgepack.exporters.", "#").replace("torch.onnx", "#")


def _code_strings(path):
    """The string literals of a module's code (docstrings left out: prose may name a backend)."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


# GGUF is also a source format: the front end reads .gguf files (source kind "gguf") with
# transformers' loader, whatever the targets.
READS_GGUF_FILES = {"exporters/sources.py", "exporters/gguf_source.py", "edgepack/stages.py"}


def test_nothing_outside_a_backends_folder_names_it():
    """A backend is its folder (exporters/<name>/) and one registry line: the CLI, the pipeline,
    the shared front end and packaging ask the registry's records and key nothing by a backend's
    name, nor import a backend's modules (what adding a backend must not touch)."""
    import re

    from edgepack.exporters.registry import BACKENDS, DEFAULT_TARGET

    names = {*BACKENDS, *(c.name for b in BACKENDS.values() for c in b.companions)}
    word = re.compile(rf"\b({'|'.join(names)})\b")
    shared = [*(REPO_ROOT / "edgepack").glob("*.py"), *(REPO_ROOT / "packaging").glob("*.py"),
              *(p for p in (REPO_ROOT / "exporters").glob("*.py") if p.name != "registry.py")]
    found = [f"{path.relative_to(REPO_ROOT)}:{line}: {value!r}" for path in shared
             for line, value in _code_strings(path) if word.search(_not_a_backend(value))
             and not (str(path.relative_to(REPO_ROOT)) in READS_GGUF_FILES and set(word.findall(value)) == {"gguf"})]
    imports = [f"{path.relative_to(REPO_ROOT)}: imports {m}" for path in shared
               for m in re.findall(r"edgepack\.exporters\.(\w+)", path.read_text()) if m in BACKENDS]
    assert not found and not imports, "\n".join(found + imports)
    assert DEFAULT_TARGET in BACKENDS

