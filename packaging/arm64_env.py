"""The emulated arm64 environment for `edgepack smoke --on arm64-emulated` (`make arm64-env`).

Everything lives in one folder the user can delete (default build/arm64 at the repository root,
or $EDGEPACK_ARM64_ENV):

  qemu-aarch64-static   Debian's qemu-user-static, only the aarch64 binary, not installed on the host
  sysroot/              Debian's arm64 python3.X and the libraries it needs, unpacked with dpkg -x
  site/                 aarch64 wheels from PyPI at the host venv's versions, unzipped, and the
                        runtimes PyPI ships only as source, cross-compiled (llama-cpp-python)
  cpuinfo               an ARM /proc/cpuinfo (LiteRT's CPU detection crashes on the host's x86 one)
  cross/                Debian's aarch64 cross compiler (g++-aarch64-linux-gnu), unpacked, not installed
  <wheel>/              for a backend with a native runner (ExecuTorch: executorch/): the aarch64
                        wheel's C++ runtime (lib/, include/, its cmake config) and bin/<runner>, the
                        backend's runner (e.g. exporters/executorch/runner/) built against it
  env.json              what was set up; written last, so its presence means the set-up completed

The versions come from the host venv at set-up time (importlib.metadata), never typed here. Once
set up, nothing touches the network: a rerun checks env.json against the host's versions and only
fetches what changed. Run: python -m edgepack.packaging.arm64_env [--dir DIR]."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import edgepack
from edgepack.errors import EXIT_ENVIRONMENT_MISSING, EdgepackError
from edgepack.exporters.backend import Arm64Runtime, CrossBuild, function
from edgepack.exporters.registry import BACKENDS

RUNTIMES = [b.arm64 for b in BACKENDS.values() if isinstance(b.arm64, Arm64Runtime)]

EXIT_NO_ARM64_ENV = EXIT_ENVIRONMENT_MISSING
# The CPU qemu emulates: a Cortex-A76 (ARMv8.2: NEON, dotprod, fp16), the big core of many phones.
# qemu's default ("max") would also offer SVE and i8mm, which most phones lack, so XNNPACK would
# pick kernels no phone runs.
QEMU_CPU = "cortex-a76"
_CPUINFO_PART = "0xd0b"  # Cortex-A76's part number, what cpuinfo parsers read
# host distribution name -> module the emulated Python imports (numpy, and each backend's arm64
# runtime in the registry); only those the host venv has are set up
WHEELS = {"numpy": "numpy", **{r.wheel: r.imports for r in RUNTIMES if r.imports}}
REQUIRED_WHEELS = ("numpy",)
# Runtimes built here from their sdist with the cross compiler (distribution -> its build), and
# the pure-Python distributions their packages import (their wheels fit any platform).
SOURCE_BUILDS = {r.wheel: r.build for r in RUNTIMES if r.build}
PURE_WHEELS = tuple(sorted({d for r in RUNTIMES for d in r.requires}))
# The backend runner built here (ExecuTorch's: its Python runtime needs libtorch, so the .pte runs
# in a C++ runner) and the distribution whose aarch64 wheel's C++ libraries it links.
[(RUNNER_DIST, RUNNER)] = [(r.wheel, r.runner) for r in RUNTIMES if r.runner]
RUNNER_SOURCE, RUNNER_NAME = RUNNER.source, RUNNER.binary
# The cross compiler's Debian package; its dependency closure minus what the host has is unpacked.
CROSS_COMPILER = "g++-aarch64-linux-gnu"
CMAKE_MIN = (3, 28)  # the wheel's cmake config gives imported targets (run paths right) from 3.28
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"
# The roots of the sysroot; their arm64 dependency closure comes from apt-cache.
SYSROOT_ROOTS = (f"{PYTHON}-minimal:arm64", f"lib{PYTHON}-stdlib:arm64", "libstdc++6:arm64")


class Arm64EnvMissing(EdgepackError):
    """The emulated arm64 environment is not set up (or is stale): nothing can run there."""

    exit_code = EXIT_NO_ARM64_ENV


class Arm64SetupError(EdgepackError):
    """A step of `make arm64-env` failed."""


def default_dir() -> Path:
    root = Path(edgepack.__file__).resolve().parent.parent
    return Path(os.environ.get("EDGEPACK_ARM64_ENV", root / "build" / "arm64"))


def host_versions() -> dict[str, str]:
    """The host venv's versions of the packages the emulated runtimes need: the one source of truth."""
    found = {}
    for dist in (*WHEELS, *PURE_WHEELS, RUNNER_DIST):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class Arm64Env:
    root: Path
    qemu: Path
    packages: dict[str, str]  # distribution -> version, installed under site/ (or the runner's, <wheel>/)
    unavailable: dict[str, str]  # distribution -> why it is not there

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def runner(self) -> Path:
        """The backend's native runner (aarch64), when its wheel is in `packages`."""
        return self.root / RUNNER_DIST / "bin" / RUNNER_NAME

    def command(self, *args: str) -> list[str]:
        """argv running the emulated Python with `args`, behind an ARM /proc/cpuinfo."""
        return self.emulate(str(self.sysroot / "usr" / "bin" / PYTHON), "-s", *args)

    def emulate(self, program: str, *args: str) -> list[str]:
        """argv running an aarch64 `program` with `args` under qemu, behind an ARM /proc/cpuinfo."""
        emulated = [str(self.qemu), "-cpu", QEMU_CPU, "-L", str(self.sysroot), program, *args]
        cpuinfo = str(self.root / "cpuinfo")
        if os.geteuid() == 0 and shutil.which("unshare"):
            # A private mount namespace: the bind mount is seen by this process tree only.
            return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /proc/cpuinfo && exec "$@"', cpuinfo, *emulated]
        if shutil.which("proot"):
            return ["proot", "-b", f"{cpuinfo}:/proc/cpuinfo", *emulated]
        raise Arm64EnvMissing("the emulated runtime needs an ARM /proc/cpuinfo: run as root (unshare -m) or "
                              "install proot", hint="Debian: apt-get install proot")

    def environment(self) -> dict[str, str]:
        code_root = Path(edgepack.__file__).resolve().parent.parent
        return {"PYTHONPATH": f"{self.root / 'site'}{os.pathsep}{code_root}", "PYTHONNOUSERSITE": "1",
                "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1"}


def load_env(root: Path | None = None) -> Arm64Env:
    """The set-up environment, or Arm64EnvMissing saying to run `make arm64-env`."""
    root = root or default_dir()
    hint = "run `make arm64-env` (downloads once, then works offline)"
    try:
        recorded = json.loads((root / "env.json").read_text())
    except FileNotFoundError:
        raise Arm64EnvMissing(f"no emulated arm64 environment at {root}", hint=hint) from None
    env = Arm64Env(root, Path(recorded["qemu"]), recorded["packages"], recorded["unavailable"])
    if not env.qemu.is_file() or not (env.sysroot / "usr" / "bin" / PYTHON).is_file():
        raise Arm64EnvMissing(f"the emulated arm64 environment at {root} is incomplete", hint=hint)
    stale = {d: v for d, v in host_versions().items() if recorded["host"].get(d) != v}
    if stale:
        raise Arm64EnvMissing(f"the emulated arm64 environment at {root} was set up for other versions than "
                              f"the host's {stale}", hint=hint)
    if RUNNER_DIST in env.packages and recorded.get("runner", {}).get("source") != _runner_digest():
        raise Arm64EnvMissing(f"the runner at {env.runner} was built from another source than "
                              f"{RUNNER_SOURCE}", hint=hint)
    return env


def _run(step: str, argv: list[str], cwd: Path | None = None, **kwargs) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, **kwargs)
    except FileNotFoundError as e:
        raise Arm64SetupError(f"{step}: {argv[0]} is not installed") from e
    if done.returncode:
        raise Arm64SetupError(f"{step}: `{' '.join(argv)}` exited with {done.returncode}: "
                              f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def _require_apt(step: str) -> None:
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise Arm64SetupError(f"{step}: needs Debian's apt-get and dpkg, which this machine lacks",
                              hint="set up on a Debian or Ubuntu machine, or copy a set-up folder here")


def _qemu(root: Path) -> Path:
    """Debian's qemu-user-static, only its aarch64 binary, under the set-up folder; else one on PATH."""
    target = root / "qemu-aarch64-static"
    if target.is_file():
        return target
    if not shutil.which("apt-get"):
        on_path = shutil.which("qemu-aarch64-static")
        if on_path:
            return Path(on_path)
        raise Arm64SetupError("qemu: no qemu-aarch64-static on PATH and no apt-get to fetch Debian's "
                              "qemu-user-static", hint="install qemu-user-static with your package manager")
    work = root / "downloads"
    work.mkdir(parents=True, exist_ok=True)
    _run("qemu", ["apt-get", "download", "-q", "qemu-user-static"], cwd=work)
    [deb] = sorted(work.glob("qemu-user-static_*.deb"))
    extracted = root / "qemu-extract"
    _run("qemu", ["dpkg-deb", "-x", str(deb), str(extracted)])
    shutil.move(extracted / "usr" / "bin" / "qemu-aarch64-static", target)
    shutil.rmtree(extracted)
    deb.unlink()
    return target


def _arm64_lists() -> None:
    """dpkg must know arm64 and apt must have its package lists (needs root, once per machine)."""
    _require_apt("sysroot")
    have = _run("sysroot", ["apt-cache", "policy", SYSROOT_ROOTS[0]])
    if "Candidate:" in have and "Candidate: (none)" not in have:
        return
    if os.geteuid() != 0:
        raise Arm64SetupError(f"sysroot: apt knows no arm64 {SYSROOT_ROOTS[0]} and adding the arm64 "
                              "architecture needs root", hint="run once as root: dpkg --add-architecture arm64 "
                                                               "&& apt-get update; then rerun")
    if "arm64" not in _run("sysroot", ["dpkg", "--print-foreign-architectures"]).split():
        _run("sysroot", ["dpkg", "--add-architecture", "arm64"])
    _run("sysroot", ["apt-get", "update", "-qq"])


def _sysroot(root: Path) -> list[str]:
    """The arm64 Python and its libraries' dependency closure, unpacked (never installed) into sysroot/."""
    stamp = root / "sysroot" / ".debs"
    if stamp.is_file():
        return stamp.read_text().split()
    _arm64_lists()
    # Host-architecture packages of the closure are not needed.
    names = [n for n in _closure("sysroot", SYSROOT_ROOTS) if n.endswith(":arm64")]
    return _unpack_debs("sysroot", names, root / "sysroot", root)


def _closure(step: str, roots) -> list[str]:
    """The packages in the dependency closure of `roots`, by apt-cache (virtual ones, listed as
    <name>, left out)."""
    tree = _run(step, ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                       "--no-breaks", "--no-replaces", "--no-enhances", *roots])
    return sorted({line for line in tree.splitlines() if not line.startswith((" ", "<"))})


def _unpack_debs(step: str, names: list[str], dest: Path, root: Path) -> list[str]:
    """The .debs of `names` downloaded and unpacked (never installed) into a fresh `dest`; their file
    names, also written to dest/.debs, which marks the folder complete."""
    work = root / "downloads"
    for folder in (dest, work):
        shutil.rmtree(folder, ignore_errors=True)
    work.mkdir(parents=True)
    _run(step, ["apt-get", "download", "-q", *names], cwd=work)
    debs = sorted(work.glob("*.deb"))
    for deb in debs:
        _run(step, ["dpkg-deb", "-x", str(deb), str(dest)])
    (dest / ".debs").write_text("\n".join(d.name for d in debs) + "\n")
    shutil.rmtree(work)
    return [d.name for d in debs]


def _platforms(debs: list[str]) -> list[str]:
    """Every manylinux tag the sysroot's glibc can load (its libc6 .deb names the version)."""
    [libc] = [d for d in debs if d.startswith("libc6_")]
    major, minor = (int(x) for x in libc.split("_")[1].split("-")[0].split(".")[:2])
    return [f"manylinux_{major}_{m}_aarch64" for m in range(minor, 16, -1)] + ["manylinux2014_aarch64"]


def _wheels(root: Path, wanted: dict[str, str], debs: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """aarch64 wheels at the host's versions: the emulated Python's unzipped into site/, the
    runner's C++ part (lib/, include/, its cmake config) into <wheel>/. A package without such
    a wheel is recorded as unavailable (its backend is then reported as not run), unless required."""
    site, work, runtime = root / "site", root / "wheels", root / RUNNER_DIST
    for folder in (site, work, runtime):
        shutil.rmtree(folder, ignore_errors=True)
    work.mkdir(parents=True)
    found, unavailable = {}, {}
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    platforms = [arg for tag in _platforms(debs) for arg in ("--platform", tag)]
    for dist, ver in wanted.items():
        if dist in SOURCE_BUILDS:  # no aarch64 wheel: _build_sources
            continue
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                               "--only-binary=:all:", *platforms, "--python-version", py, "--no-deps",
                               "--dest", str(work / dist), f"{dist}=={ver}"], capture_output=True, text=True, check=False)
        if done.returncode:
            why = f"no aarch64 wheel of {dist} {ver} for cp{py} on the package index"
            if dist in REQUIRED_WHEELS or "No matching distribution" not in done.stderr:
                raise Arm64SetupError(f"wheels: pip could not download {dist}=={ver} for aarch64: "
                                      f"{done.stderr.strip()[-1500:]}", hint="check the network and rerun")
            unavailable[dist] = why
            continue
        [wheel] = (work / dist).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            if dist == RUNNER_DIST:  # the C++ runtime only: its Python part needs libtorch
                z.extractall(root, [n for n in z.namelist() if n.split("/")[1:2] in (["lib"], ["include"], ["share"])])
                (runtime / "wheel.txt").write_text(wheel.name + "\n")  # its platform tag, for the record
            else:
                z.extractall(site)
        found[dist] = ver
    shutil.rmtree(work)
    return found, unavailable


def _cross_compiler(root: Path) -> Path:
    """Debian's aarch64 g++ unpacked into cross/ (with what the host lacks of its dependency
    closure): no root, nothing installed on the host. Returns the g++ driver."""
    cross = root / "cross"
    gxx = cross / "usr" / "bin" / "aarch64-linux-gnu-g++"
    if (cross / ".debs").is_file() and gxx.is_file():
        return gxx
    _require_apt("cross compiler")
    names = _closure("cross compiler", [CROSS_COMPILER])
    have = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Status}\n", *names],
                          capture_output=True, text=True, check=False).stdout
    installed = {line.split()[0] for line in have.splitlines() if line.endswith("install ok installed")}
    _unpack_debs("cross compiler", [n for n in names if n not in installed], cross, root)
    return gxx


def _runner_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(RUNNER_SOURCE.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _cmake() -> Path:
    """The venv's pinned CMake (pyproject: cmake), or one on PATH if it is recent enough."""
    for cmake in (Path(sys.executable).parent / "cmake", shutil.which("cmake")):
        if cmake and Path(cmake).is_file():
            found = _run("runner", [str(cmake), "--version"]).split()[2]
            if tuple(int(x) for x in found.split(".")[:2]) >= CMAKE_MIN:
                return Path(cmake)
    raise Arm64SetupError(f"runner: building {RUNNER_NAME} needs CMake >= {'.'.join(map(str, CMAKE_MIN))}",
                          hint="make install (it pins cmake in the venv)")


def _cross_build(root: Path, folder: Path) -> CrossBuild:
    """The unpacked cross compiler as a CMake toolchain file written in `folder`."""
    cross = root / "cross"
    gxx = _cross_compiler(root)
    toolchain = folder / "toolchain.cmake"
    toolchain.write_text(f'set(CMAKE_SYSTEM_NAME Linux)\nset(CMAKE_SYSTEM_PROCESSOR aarch64)\n'
                         f'set(CMAKE_SYSROOT "{cross}")\nset(CMAKE_CXX_COMPILER "{gxx}")\n'
                         f'set(CMAKE_C_COMPILER "{gxx.with_name("aarch64-linux-gnu-gcc")}")\n')
    # The unpacked binutils' own libraries (libopcodes for arm64, ...) are beside them, not on the host.
    env = {**os.environ, "LD_LIBRARY_PATH": str(cross / "usr" / "lib" / "x86_64-linux-gnu")}
    return CrossBuild(_cmake(), toolchain, env, os.cpu_count() or 1)


def _build_runner(root: Path) -> dict:
    """The backend's native runner, cross-compiled against the unpacked wheel: the wheel's cmake
    config supplies the libraries, compile definitions and run paths."""
    runtime, build = root / RUNNER_DIST, root / RUNNER_DIST / "build"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    cross = _cross_build(root, build)
    cmake, env = str(cross.cmake), dict(cross.env)
    _run("runner", [cmake, "-S", str(RUNNER_SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_TOOLCHAIN_FILE={cross.toolchain}", f"-D{RUNNER_DIST}_DIR={runtime / 'lib' / 'cmake' / RUNNER_DIST}",
                    f"-DCMAKE_RUNTIME_OUTPUT_DIRECTORY={runtime / 'bin'}"], env=env)
    _run("runner", [cmake, "--build", str(build), "-j", str(cross.jobs)], env=env)
    gxx = _cross_compiler(root)  # unpacked already: returns its path
    compiler = _run("runner", [str(gxx), "-dumpfullversion"], env=env).strip()
    shutil.rmtree(build)
    return {"source": _runner_digest(), "wheel": (runtime / "wheel.txt").read_text().strip(),
            "compiler": f"{gxx.name} {compiler}"}


def _build_sources(root: Path, wanted: dict[str, str], say) -> tuple[dict[str, str], dict[str, str]]:
    """The runtimes PyPI ships only as source, built for aarch64 into site/ at the host's versions
    (minutes each, on every core). Returns what was built and the line each build gave."""
    built, lines = {}, {}
    for dist, build in SOURCE_BUILDS.items():
        if dist not in wanted:
            continue
        say(f"arm64-env: building {dist} {wanted[dist]} for aarch64 from its sdist (a few minutes)")
        with tempfile.TemporaryDirectory(prefix="edgepack-cross-") as tmp:
            try:
                lines[dist] = function(build)(root / "site", wanted[dist], _cross_build(root, Path(tmp)))
            except subprocess.CalledProcessError as e:
                raise Arm64SetupError(f"{dist}: building it for aarch64 failed ({' '.join(map(str, e.cmd[:3]))} ...): "
                                      f"{(e.stderr or e.stdout or '').strip()[-1500:]}",
                                      hint="check the network (pip downloads the sdist) and rerun") from e
        built[dist] = wanted[dist]
    return built, lines


def _cpuinfo(path: Path) -> None:
    block = ("processor\t: {n}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
             "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
             f"CPU variant\t: 0x4\nCPU part\t: {_CPUINFO_PART}\nCPU revision\t: 1\n\n")
    path.write_text("".join(block.format(n=n) for n in range(os.cpu_count() or 1)))


def _self_test(env: Arm64Env) -> str:
    modules = ", ".join(WHEELS[d] for d in env.packages if d in WHEELS)
    probe = f"import platform, {modules}; print(platform.machine(), 'imports {modules}')"
    said = _run("self-test", env.command("-c", probe), env=env.environment(), timeout=300).strip()
    if RUNNER_DIST not in env.packages:
        return said
    try:
        return f"{said}; {function(RUNNER.self_test)(env)}"
    except EdgepackError as e:
        raise Arm64SetupError(str(e)) from e


def set_up(root: Path | None = None, say=print) -> Arm64Env:
    """Idempotent: each part is fetched once; a rerun with unchanged host versions is offline.
    Concurrent callers (two test workers, two `make arm64-env`) take turns: the second finds the
    first one's work done."""
    root = (root or default_dir()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with (root.parent / f".{root.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _set_up(root, say)


def _set_up(root: Path, say) -> Arm64Env:
    wanted = host_versions()
    missing = [d for d in REQUIRED_WHEELS if d not in wanted]
    if missing:
        raise Arm64SetupError(f"the host venv lacks {missing}: its versions are the ones set up")
    recorded = json.loads((root / "env.json").read_text()) if (root / "env.json").is_file() else None
    qemu = _qemu(root)
    debs = _sysroot(root)
    if recorded and recorded["host"] == wanted and (root / "site").is_dir():
        packages, unavailable, sources = recorded["packages"], recorded["unavailable"], recorded.get("built", {})
    else:
        (root / "env.json").unlink(missing_ok=True)
        say(f"arm64-env: fetching aarch64 wheels for {wanted}")
        packages, unavailable = _wheels(root, wanted, debs)
        built, sources = _build_sources(root, wanted, say)
        packages.update(built)
        recorded = None
    env = Arm64Env(root, qemu, packages, unavailable)
    runner = {}
    if RUNNER_DIST in packages:
        runner = recorded.get("runner", {}) if recorded else {}
        if runner.get("source") != _runner_digest() or not env.runner.is_file():
            say(f"arm64-env: building {RUNNER_NAME} against the aarch64 {RUNNER_DIST} {packages[RUNNER_DIST]} wheel")
            runner = _build_runner(root)
    _cpuinfo(root / "cpuinfo")
    say(f"arm64-env: self-test: {_self_test(env)}")
    (root / "env.json").write_text(json.dumps({"qemu": str(qemu), "cpu": QEMU_CPU, "python": PYTHON, "host": wanted,
                                               "packages": packages, "unavailable": unavailable, "debs": debs,
                                               "runner": runner, "built": sources}, indent=2, sort_keys=True) + "\n")
    for dist, why in unavailable.items():
        say(f"arm64-env: {dist} not set up: {why}")
    say(f"arm64-env: ready at {root} ({', '.join(f'{d} {v}' for d, v in packages.items())})")
    return env


def main(argv: list[str]) -> int:
    root = Path(argv[argv.index("--dir") + 1]) if "--dir" in argv else None
    try:
        set_up(root)
    except EdgepackError as e:
        print(f"error: {e.message}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
