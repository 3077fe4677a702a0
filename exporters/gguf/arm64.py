"""llama.cpp for the emulated arm64 CPU. PyPI has no aarch64 wheel of llama-cpp-python (it is an
sdist that builds llama.cpp with CMake), so `make arm64-env` builds the same sdist, at the host
venv's version, with the aarch64 cross compiler: llama.cpp's libllama and ggml for ARMv8.2 with
dot product and fp16 (the Cortex-A76 qemu emulates, a phone's big core), and the package's
Python bindings beside them, as its own wheel lays them out (llama_cpp/ with lib/ inside). Only
the library target is built: the bindings load nothing else."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from edgepack.exporters.backend import CrossBuild

DIST = "llama-cpp-python"
# ggml's CPU kernels for the emulated core: NEON, dot product, fp16 arithmetic; what phones from
# about 2019 run. Not -march=native (the host is x86), no OpenMP (ggml's own thread pool).
CMAKE_ARGS = ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16", "-DGGML_OPENMP=OFF",
              "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
              "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release",
              # the libraries find each other beside themselves once copied into llama_cpp/lib
              "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN")


def _sdist(version: str, folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-binary", ":all:", "--dest", str(folder), f"{DIST}=={version}"], check=True,
                   capture_output=True, text=True)
    [sdist] = folder.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(folder, filter="data")
    [tree] = (p for p in folder.iterdir() if p.is_dir())
    return tree


def build_llama_cpp(site: Path, version: str, cross: CrossBuild) -> str:
    """llama_cpp/ (bindings and lib/) in `site`, built from llama-cpp-python `version`'s sdist."""
    with tempfile.TemporaryDirectory(prefix="edgepack-llama-cpp-arm64-") as tmp:
        tree = _sdist(version, Path(tmp))
        build = Path(tmp) / "build"
        for argv in ([str(cross.cmake), "-S", str(tree / "vendor" / "llama.cpp"), "-B", str(build),
                      f"-DCMAKE_TOOLCHAIN_FILE={cross.toolchain}", *CMAKE_ARGS],
                     [str(cross.cmake), "--build", str(build), "--target", "llama", "-j", str(cross.jobs)]):
            subprocess.run(argv, check=True, capture_output=True, text=True, env=dict(cross.env))
        package = site / "llama_cpp"
        shutil.rmtree(package, ignore_errors=True)
        shutil.copytree(tree / "llama_cpp", package, ignore=shutil.ignore_patterns("server"))
        (package / "lib").mkdir()
        built = sorted(p for p in (build / "bin").glob("lib*.so*"))
        for lib in built:
            shutil.copy2(lib, package / "lib" / lib.name, follow_symlinks=False)
    names = sorted({p.name.split(".so")[0] for p in built})
    return f"{DIST} {version} built for aarch64 ({', '.join(names)}; {CMAKE_ARGS[1].split('=')[1]})"
