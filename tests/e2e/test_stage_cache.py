"""The stage cache on real exports of the tiny Llama to GGUF and ONNX (the quickest backends to
lower): a `kill -9` mid-export and the resumed export, byte-identical bundles with and without the
cache, a damaged entry remade, `edgepack cache info|prune`, and concurrent writers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from edgepack.cache import StageCache
from tests.conftest import REPO_ROOT, export_json, run_cli

pytestmark = pytest.mark.slow

TARGETS = ("--target", "gguf,onnx")


def _entries(cache: Path, kind: str) -> dict[str, Path]:
    """backend (or key) -> entry folder, of the finished entries of `kind`."""
    found = {}
    for entry in (cache / kind).glob("*/entry.json") if (cache / kind).is_dir() else ():
        record = json.loads(entry.read_text())
        found[record["value"]["backend"] if kind == "artifact" else entry.parent.name] = entry.parent
    return found


def _tree(bundle: Path) -> dict[str, str]:
    return {p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(bundle.rglob("*")) if p.is_file()}


def _stage_seconds(summary: dict, name: str) -> float:
    [stage] = [s for s in summary["stages"] if s["name"] == name]
    return stage["seconds"]


@pytest.fixture(scope="module")
def resumed(llama_dir, tmp_path_factory, monkeypatch_module):
    """An export killed (-9) while it lowers ONNX, after its plan and GGUF artifact were kept,
    then the same export again: (cache, killed export's out, the resumed summary)."""
    root = tmp_path_factory.mktemp("stage-cache")
    cache, out = root / "cache", root / "out"
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_NO_CACHE"}
    child = subprocess.Popen([sys.executable, "-m", "edgepack", "export", str(llama_dir), *TARGETS, "--cache-dir", str(cache),
                              "--out", str(out)], env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while "gguf" not in _entries(cache, "artifact") and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "the export ended before it could be killed mid-way"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not (out / "tiny-llama").exists(), "a killed export must not leave a bundle"
    assert "onnx" not in _entries(cache, "artifact")
    monkeypatch_module.delenv("EDGEPACK_NO_CACHE")
    code, summary = export_json(str(llama_dir), *TARGETS, "--cache-dir", str(cache), "--out", str(out))
    assert code == 0, summary
    return cache, out, summary


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_a_killed_export_resumes_at_its_last_finished_stage(resumed):
    cache, out, summary = resumed
    # the plan, fp32's perplexity (measured before the offset grid's fit, ahead of both offset-grid
    # lowerings) and GGUF's lowering finished before the kill: taken from the cache; ONNX's did not
    assert summary["cache"] == {"dir": str(cache), "reused": ["plan precision", "lower gguf", "quality fp32"]}
    assert _stage_seconds(summary, "lower gguf") < 2
    # fp32's answers on the evaluation text, and each artifact's perplexity there
    assert set(_entries(cache, "artifact")) == {"gguf", "onnx"} and len(_entries(cache, "quality")) == 3


def test_a_cached_export_is_the_same_bytes_as_an_uncached_one(resumed, llama_dir, tmp_path):
    _, out, summary = resumed
    assert run_cli("export", llama_dir, *TARGETS, "--no-cache", "--out", tmp_path).exit_code == 0
    assert _tree(tmp_path / "tiny-llama") == _tree(out / "tiny-llama")


def test_adding_nothing_new_reuses_every_slow_stage(resumed, llama_dir, tmp_path):
    cache, out, _ = resumed
    code, summary = export_json(str(llama_dir), "--target", "gguf", "--cache-dir", str(cache), "--out", str(tmp_path))
    assert code == 0
    assert summary["cache"]["reused"] == ["plan precision", "lower gguf", "quality fp32", "quality gguf"]
    slow = ("plan precision", "lower gguf", "quality")
    assert sum(_stage_seconds(summary, s) for s in slow) < 2, summary["stages"]


def test_a_damaged_entry_is_remade_not_used(resumed, llama_dir, tmp_path):
    cache, _, _ = resumed
    entry = _entries(cache, "artifact")["gguf"]
    model = entry / "files" / "gguf" / "model.gguf"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    code, summary = export_json(str(llama_dir), "--target", "gguf", "--cache-dir", str(cache), "--out", str(tmp_path))
    assert code == 0 and "lower gguf" not in summary["cache"]["reused"]
    assert _entries(cache, "artifact")["gguf"].joinpath("files", "gguf", "model.gguf").read_bytes() != bytes(data)


def test_cache_info_and_prune(resumed, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(resumed[0], cache)
    info = json.loads(run_cli("cache", "info", "--cache-dir", cache, "--json").stdout)
    sizes = {kind: sum(p.stat().st_size for e in (cache / kind).glob("*") for p in e.rglob("*") if p.is_file())
             for kind in ("plan", "artifact", "quality")}
    assert {k: v["bytes"] for k, v in info["kinds"].items()} == sizes
    assert info["kinds"]["artifact"]["entries"] == 2 and info["bytes"] == sum(sizes.values())
    keep = sizes["artifact"] // 2  # less than the two artifacts: the least recently used goes first
    pruned = json.loads(run_cli("cache", "prune", "--max-size", str(keep), "--cache-dir", cache, "--json").stdout)
    assert pruned["bytes"] <= keep and pruned["removed"] >= 1
    assert json.loads(run_cli("cache", "prune", "--cache-dir", cache, "--json").stdout)["bytes"] == 0
    bad = run_cli("cache", "prune", "--max-size", "lots", "--cache-dir", cache)
    assert bad.exit_code == 2 and "'lots' is not a size" in bad.stderr


def _store_and_read(root: str) -> bool:
    cache = StageCache(Path(root))
    value = {"payload": "x" * 2_000_000}
    ok = True
    for _ in range(20):
        cache.put_json("plan", "same-key", value)
        ok &= cache.get_json("plan", "same-key", "plan") == value
    return ok


def test_concurrent_exports_sharing_a_cache_never_read_a_partial_entry(tmp_path):
    with ProcessPoolExecutor(2) as pool:
        assert all(pool.map(_store_and_read, [str(tmp_path)] * 4))
    assert [p.name for p in (tmp_path / "plan").iterdir()] == ["same-key"]
    assert not [p for p in (tmp_path / "tmp").iterdir()]


def test_keys_follow_content_not_identity_and_refuse_what_they_cannot_read():
    import numpy as np
    import torch

    from edgepack.cache import digest

    weights = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert digest({"a": 1, "b": weights}) == digest({"b": weights.clone(), "a": 1})  # order and identity do not count
    assert digest(weights) != digest(weights.to(torch.float64))  # dtype does
    assert digest(weights) != digest(weights.reshape(3, 2))  # shape does
    assert digest(np.zeros(3)) != digest(torch.zeros(3, dtype=torch.float64))  # array vs tensor
    assert digest((1, "1")) != digest(("1", 1)) and digest(1) != digest(1.0) != digest(True)
    with pytest.raises(TypeError, match="cannot key a object"):
        digest({"x": object()})
