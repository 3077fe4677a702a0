"""Many models in one release: `edgepack plan` (and its GitHub matrix) and `edgepack export-many`
over a release file, with a model that exports, one that fails and a bad file refused whole."""

from __future__ import annotations

import json

import pytest
import yaml

from edgepack.exporters.registry import BACKENDS
from tests.conftest import REPO_ROOT, run_cli

CORPUS = REPO_ROOT / "demo_model" / "corpus.txt"


def _release(tmp_path, text: str):
    path = tmp_path / "release.toml"
    path.write_text(text)
    return path


def test_the_github_matrix_is_one_job_per_model_and_target(tmp_path, llama_dir, bert_dir):
    release = _release(tmp_path, f"""
[defaults]
target = "onnx,gguf"
[[model]]
source = "{llama_dir}"
[[model]]
source = "{bert_dir}"
name = "bert"
target = "all"
pooling = "mean"
""")
    result = run_cli("plan", release, "--github-matrix")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"include": [{"model": "tiny-llama", "target": "onnx"},
                                                     {"model": "tiny-llama", "target": "gguf"},
                                                     *({"model": "bert", "target": b} for b in BACKENDS)]}
    assert len(result.stdout.strip().splitlines()) == 1  # one line, as $GITHUB_OUTPUT takes it
    shown = run_cli("plan", release).stdout.splitlines()
    assert shown == [f"tiny-llama: edgepack export {llama_dir} --name tiny-llama --target onnx,gguf",
                     f"bert: edgepack export {bert_dir} --name bert --target all --pooling mean"]


@pytest.mark.parametrize("text, message", [
    ('[[model]]\nsource = "m"\ntargett = "onnx"', "[[model]] 1: 'targett' is not an option"),
    ('[[model]]\nsource = "m"\njson = true', "[[model]] 1: 'json' is not an option"),
    ('[[model]]\nsource = "m"\nstrict = "yes"', "strict is a switch: true or false"),
    ('[[model]]\nsource = "a/m"\n[[model]]\nsource = "b/m"', "[[model]] 1 and 2 both make the bundle 'm'"),
    ('[[model]]\nname = "m"', "[[model]] 1 has no source"),
    ('[defaults]\ntarget = "onnx"', "no [[model]] entries"),
    ('[[model]\nsource = "m"', "not valid TOML"),
    ('[models]\nsource = "m"', "unknown table 'models'"),
])
def test_a_bad_release_file_runs_nothing(tmp_path, text, message):
    release = _release(tmp_path, text)
    for command in (("plan", release), ("export-many", release)):
        result = run_cli(*command)
        assert result.exit_code == 2, result.stderr
        assert message in result.stderr and str(release) in result.stderr
    assert not (tmp_path / "dist").exists()


@pytest.mark.slow
def test_export_many_goes_on_past_a_failure_and_sums_up(tmp_path, llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    release = _release(tmp_path, f"""
[defaults]
target = "gguf"
mixed-precision = "off"
eval-text = "{CORPUS}"
[[model]]
source = "{tmp_path / 'no-such-model'}"
[[model]]
source = "{llama_dir}"
name = "llama"
""")
    result = run_cli("export-many", release, "--json")
    assert result.exit_code == 2, result.stderr  # the worst of the exports': the missing model's
    report = json.loads(result.stdout)
    missing, llama = report["exports"]
    assert (missing["exit_code"], missing["summary"]["ok"]) == (2, False)
    assert "no-such-model" in missing["summary"]["error"]["message"]
    assert (llama["exit_code"], llama["summary"]["ok"]) == (0, True)
    assert llama["argv"] == ["edgepack", "export", str(llama_dir), "--name", "llama", "--target", "gguf",
                             "--mixed-precision", "off", "--eval-text", str(CORPUS)]
    bundle = tmp_path / "dist" / "llama"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["verdict"]["passed"] and [a["backend"] for a in manifest["artifacts"]] == ["gguf"]
    assert llama["summary"]["artifacts"][0]["sha256"] == manifest["artifacts"][0]["sha256"]
    assert "llama" in result.stderr and "exit 2" in result.stderr  # the table
    # one matrix job: only that model, only that target
    one = run_cli("export-many", release, "--only", "llama", "--target", "onnx")
    assert one.exit_code == 2 and "--target onnx: not among llama's targets (gguf)" in one.stderr


def test_the_release_workflow_fans_out_the_plan(tmp_path):
    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "release-models.yml").read_text())
    plan_steps = " ".join(s.get("run", "") for s in workflow["jobs"]["plan"]["steps"])
    assert "edgepack plan release.toml --github-matrix" in plan_steps
    export = workflow["jobs"]["export"]
    assert export["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    runs = " ".join(s.get("run", "") for s in export["steps"])
    assert "edgepack export-many release.toml --only ${{ matrix.model }} --target ${{ matrix.target }}" in runs
    [cache] = [s for s in export["steps"] if s.get("uses", "").startswith("actions/cache")]
    assert cache["with"]["path"] == "~/.cache/edgepack"
    # the release file the workflow plans is a valid one
    result = run_cli("plan", REPO_ROOT / "release.toml", "--github-matrix")
    assert result.exit_code == 0, result.stderr
