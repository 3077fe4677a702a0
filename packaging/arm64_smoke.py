"""`edgepack smoke BUNDLE --on arm64-emulated`: the bundle's artifacts on the arm64 builds of their
runtimes (the ARM kernels phones run: XNNPACK's NEON/dotprod paths, int4 unpacking), under qemu
user-mode emulation on an x86 host.

The emulated Python (arm64_worker) replays the golden cases through the Python runtimes (LiteRT,
ONNX Runtime) and writes the raw outputs; an artifact whose runtime has no aarch64 Python (the
ExecuTorch .pte) runs in its backend's native runner, which the host drives call by call. The host judges both with the same code
as the host smoke test (smoke.smoke_bundle), then compares them with the same artifact on the x86
build of the same runtime version (the arm64-vs-x86 difference). A backend whose runtime cannot
run there is reported as not run, never as passed."""

from __future__ import annotations

import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from edgepack.cases import Case, CaseOutput, compare, run_case
from edgepack.errors import RuntimeUnavailableError, SmokeFailure
from edgepack.exporters.backend import Arm64Runtime, function
from edgepack.exporters.registry import BACKENDS
from edgepack.packaging.arm64_env import Arm64Env, load_env
from edgepack.packaging.smoke import BackendSmoke, expected_output, golden_cases, host_replay, smoke_bundle

WHERE = "arm64-emulated"
WORKER_TIMEOUT_S = 1800


@dataclass
class Arm64Smoke:
    results: list[BackendSmoke]
    not_run: dict[str, str]  # backend -> why it cannot run on arm64-emulated
    notes: dict[str, str]  # backend -> how it ran, where that differs from an app

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


def _runner(backend: str):
    """The backend's native runner (NativeRunner), where its artifact runs instead of in the
    emulated Python; None for those the emulated Python runs."""
    arm64 = BACKENDS[backend].arm64
    return arm64.runner if isinstance(arm64, Arm64Runtime) else None


def cannot_run(env: Arm64Env, backend: str) -> str | None:
    """Why `backend` cannot run on the emulated arm64 CPU, or None when it can."""
    arm64 = BACKENDS[backend].arm64
    if not isinstance(arm64, Arm64Runtime):
        return arm64
    if arm64.wheel not in env.packages:
        return env.unavailable.get(arm64.wheel, f"{arm64.wheel} is not installed on the host, so no aarch64 build "
                                                "was set up")
    return None


def _recorded(out: Path, stderr: str, returncode: int):
    """A replay that reads what the emulated worker wrote (smoke.Replay)."""

    def replay(bundle: Path, artifact: dict) -> Callable[[Case], CaseOutput]:
        machine = (out / "machine.txt").read_text() if (out / "machine.txt").is_file() else None
        if machine != "aarch64":
            raise SmokeFailure(f"the emulated run did not report an aarch64 machine ({machine}; exit code "
                               f"{returncode}): {stderr.strip()[-1500:]}")
        folder = out / artifact["backend"]
        if (folder / "error.txt").is_file():
            raise SmokeFailure(f"on {WHERE}: {(folder / 'error.txt').read_text()}")

        def run(case: Case, forced: CaseOutput | None = None) -> CaseOutput:
            path = folder / f"{case.name}{'.forced' if forced is not None else ''}.npz"
            if not path.is_file():
                raise SmokeFailure(f"the emulated arm64 run wrote no output for case {case.name!r} "
                                   f"(exit code {returncode}): {stderr.strip()[-1500:]}")
            with np.load(path, allow_pickle=False) as saved:
                return CaseOutput(tuple(saved.files), tuple(saved[n] for n in saved.files))

        return run

    return replay


def _vs_x86(bundle: Path, manifest: dict, results: list[BackendSmoke], arm64) -> None:
    """The same artifact on the x86 build of the same runtime: the difference the instruction set
    makes (greedy cases teacher-forced on the reference's tokens, so every step compares)."""
    cases = golden_cases(bundle, manifest)
    for result in results:
        if result.error:
            continue
        artifact = next(a for a in manifest["artifacts"] if a["backend"] == result.backend)
        try:
            x86, arm = host_replay(bundle, artifact), arm64(bundle, artifact)
            for case, refs in cases:
                forced = expected_output(bundle, refs[result.backend]) if case.kind == "greedy" else None
                result.cases[case.name]["vs_x86"] = compare(x86(case, forced), arm(case, forced))
        except Exception as e:  # the x86 runtime failing is recorded, the arm64 verdict stands
            for case, _ in cases:
                result.cases[case.name]["vs_x86"] = {"error": f"{type(e).__name__}: {e}"}


def smoke_arm64(bundle: Path, manifest: dict, backends: list[str] | None = None,
                env: Arm64Env | None = None) -> Arm64Smoke:
    env = env or load_env()
    wanted = [a["backend"] for a in manifest["artifacts"] if not backends or a["backend"] in backends]
    not_run = {b: why for b in wanted if (why := cannot_run(env, b))}
    to_run = [b for b in wanted if b not in not_run]
    for artifact in (a for a in manifest["artifacts"] if a["backend"] in wanted):
        not_run.update({c.name: c.arm64 for c in BACKENDS[artifact["backend"]].companions
                        if artifact["runtime"].get(c.file_key)})
    if not wanted:
        return Arm64Smoke([], {}, {})
    if not to_run:
        raise RuntimeUnavailableError(f"{bundle}: no artifact here can run on {WHERE}: "
                                      + "; ".join(f"{b}: {why}" for b, why in not_run.items()))
    with tempfile.TemporaryDirectory(prefix="edgepack-arm64-") as tmp, ExitStack() as runners:
        out = Path(tmp)
        in_python = [b for b in to_run if not _runner(b)]
        recorded = _recorded(out, *_run_worker(env, bundle, out, in_python)) if in_python else None

        def replay(bundle: Path, artifact: dict):
            runner = _runner(artifact["backend"])
            if not runner:
                return recorded(bundle, artifact)
            call = runners.enter_context(function(runner.start)(env, bundle / artifact["path"])).call
            return lambda case, forced=None: run_case(case, call, forced)

        results = smoke_bundle(bundle, manifest, to_run, replay=replay, where=WHERE)
        _vs_x86(bundle, manifest, results, replay)
    notes = {}
    for result in results:
        if runner := _runner(result.backend):
            result.runtime, notes[result.backend] = f"{result.backend} {WHERE} ({runner.binary})", runner.note
    return Arm64Smoke(results, not_run, notes)


def _run_worker(env: Arm64Env, bundle: Path, out: Path, backends: list[str]) -> tuple[str, int]:
    """The emulated Python replaying `backends` into `out`: its stderr and exit code."""
    try:
        done = subprocess.run(env.command("-m", "edgepack.packaging.arm64_worker", str(bundle.resolve()), str(out),
                                          *backends),
                              env=env.environment(), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        return done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        return f"timed out after {WORKER_TIMEOUT_S} s: {e.stderr or ''}", -1


def print_arm64(console: Console, smoke: Arm64Smoke) -> None:
    """What the host table does not show: arm64 against x86 on the same runtime, and what did not run."""
    table = Table(title=f"{WHERE} vs x86 host (same artifact, same runtime version)", title_justify="left")
    for col in ("backend", "case", "tokens", "min cosine", "max abs diff"):
        table.add_column(col)
    for r in smoke.results:
        for name, m in r.cases.items():
            d = m.get("vs_x86", {})
            if "error" in d:
                table.add_row(r.backend, name, "[red]x86 run failed[/]", "-", d["error"])
                continue
            tokens = ("-" if "tokens_match" not in d else "same top-1" if d["tokens_match"]
                      else f"top-1 differs at {', '.join(str(m['step']) for m in d['top1_mismatches'])}")
            table.add_row(r.backend, name, tokens, str(d.get("min_cosine", "-")), str(d.get("max_abs_diff", "-")))
    if table.row_count:
        console.print(table)
    for backend, how in smoke.notes.items():
        console.print(f"note: {backend}: {how}", highlight=False, soft_wrap=True)
    for backend, why in smoke.not_run.items():
        console.print(f"[yellow]not run[/] on {WHERE}: {backend}: {why}", highlight=False, soft_wrap=True)
