"""llama.cpp's own path to a 4-bit GGUF, the anchor edgepack's GGUF is measured beside in
`make bench-quality`: its `convert_hf_to_gguf.py` turns the Hugging Face folder into an F16 GGUF,
then its quantizer (`llama_model_quantize`, what the `llama-quantize` tool calls) makes Q4_K_M.

Both come from the llama.cpp that edgepack's GGUF smoke runs: the converter from the
llama-cpp-python sdist pinned in pyproject.toml (downloaded once with pip, sha256-checked; its
vendor/llama.cpp), the quantizer from the installed llama-cpp-python built from that sdist.

  python -m bench.llama_cpp_anchor HF_DIR OUT_DIR      (prints the Q4_K_M file's path)"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

from bench.run import ROOT

# sha256 of llama-cpp-python's sdist, per version (pyproject.toml pins the version); a version
# without an entry fails here: add its digest when the pin moves.
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
MIX = "Q4_K_M"


def llama_cpp_tree(cache: Path) -> Path:
    """vendor/llama.cpp of the pinned sdist (the converter, its `conversion` package and gguf-py),
    extracted beside the sdist once."""
    pinned = version("llama-cpp-python")
    if pinned not in SDIST_SHA256:
        raise SystemExit(f"no sha256 recorded for llama-cpp-python {pinned}'s sdist (bench/llama_cpp_anchor.py)")
    sdist = cache / f"llama_cpp_python-{pinned}.tar.gz"
    if not sdist.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                        "--no-binary", ":all:", "--dest", str(cache), f"llama-cpp-python=={pinned}"], check=True)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256[pinned]:
        sdist.unlink()
        raise SystemExit(f"{sdist}: sha256 {digest} is not the pinned {SDIST_SHA256[pinned]}; deleted, run again")
    tree = cache / f"llama.cpp-{pinned}"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        prefix = f"llama_cpp_python-{pinned}/vendor/llama.cpp/"
        wanted = (f"{prefix}convert_hf_to_gguf.py", f"{prefix}conversion/", f"{prefix}gguf-py/")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
            for member in members:
                member.name = member.name.removeprefix(prefix)
            tar.extractall(tree, members, filter="data")
    return tree


def convert_and_quantize(hf_dir: Path, out_dir: Path) -> Path:
    """llama.cpp's Q4_K_M of the model in `hf_dir`, made in `out_dir` (kept when already there)."""
    from edgepack.exporters.gguf.options import LLAMA_CPP_MIXES
    from edgepack.exporters.gguf.runtime import quantize

    out = out_dir / f"model-{MIX}.gguf"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tree, f16 = llama_cpp_tree(ROOT / "build" / "wheels"), out_dir / "model-F16.gguf"
    # the converter puts its own gguf-py first on the path (as in a llama.cpp checkout)
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir.resolve()), "--outtype", "f16",
                    "--outfile", str(f16.resolve())], cwd=tree, check=True, stdout=subprocess.DEVNULL)
    quantize(f16, out, LLAMA_CPP_MIXES[MIX])
    f16.unlink()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.llama_cpp_anchor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    print(convert_and_quantize(args.hf_dir, args.out_dir))


if __name__ == "__main__":
    main()
