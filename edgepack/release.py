"""Many models in one release: a release file (TOML) lists models × targets × export options; `edgepack
export-many` runs them in sequence, `edgepack plan --github-matrix` fans them out as a CI matrix.

    [defaults]                     # every model's export flags, unless the model sets its own
    target = "executorch,onnx"
    out = "dist"

    [[model]]
    source = "build/smollm2-135m-instruct"
    name = "smollm2"               # the bundle's name, and the job's
    target = "all"
    max-ppl-increase = 12

Keys are `edgepack export`'s long flags without the dashes; `true` gives a switch, a list repeats a
flag. Each export runs as its own `edgepack export` process: one model's memory is given back
before the next starts, and a crash in one converter fails that model alone."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgepack.errors import InputError
from edgepack.exporters.registry import BACKENDS, DEFAULT_TARGET

# Flags export-many sets itself on every export it runs.
RESERVED = ("json", "verbose", "help")


@dataclass(frozen=True)
class Job:
    name: str
    source: str
    targets: str
    flags: tuple[str, ...]  # every other export flag, as typed on a command line

    def argv(self, target: str | None = None) -> list[str]:
        return [self.source, "--name", self.name, "--target", target or self.targets, *self.flags]

    def target_list(self) -> list[str]:
        return list(BACKENDS) if self.targets == "all" else [t.strip() for t in self.targets.split(",") if t.strip()]


def read_release(path: Path, options: dict[str, dict]) -> list[Job]:
    """The release file's jobs, every key checked against `options` (export's long flags: name ->
    {"flag": bool, "multiple": bool}) before anything runs."""
    try:
        release = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such release file", hint="see `edgepack export-many --help` for its form") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(release) - {"defaults", "model"})
    if unknown:
        raise InputError(f"{path}: unknown table {unknown[0]!r}", hint="a release file has [defaults] and [[model]] entries")
    models = release.get("model")
    if not isinstance(models, list) or not models:
        raise InputError(f"{path}: no [[model]] entries", hint='add one: [[model]] with source = "path/to/model"')
    defaults = release.get("defaults", {})
    jobs = [_job(path, f"[[model]] {i + 1}", {**defaults, **model}, options) for i, model in enumerate(models)]
    seen: dict[str, int] = {}
    for i, job in enumerate(jobs):
        if job.name in seen:
            raise InputError(f"{path}: [[model]] {seen[job.name] + 1} and {i + 1} both make the bundle {job.name!r}",
                             hint='give one of them its own name = "..."')
        seen[job.name] = i
    return jobs


def _job(path: Path, where: str, entry: dict[str, Any], options: dict[str, dict]) -> Job:
    from edgepack.packaging.bundle import check_bundle_name

    if not isinstance(entry.get("source"), str):
        raise InputError(f"{path}: {where} has no source", hint='source = "a model directory, hub id or file"')
    flags: list[str] = []
    for key, value in entry.items():
        if key in ("source", "name", "target"):
            continue
        option = options.get(key)
        if option is None or key in RESERVED:
            raise InputError(f"{path}: {where}: {key!r} is not an option export-many can pass to `edgepack export`",
                             hint="keys are export's long flags without the dashes (see `edgepack export --help`)")
        if option["flag"]:
            if not isinstance(value, bool):
                raise InputError(f"{path}: {where}: {key} is a switch: true or false")
            flags += [f"--{key}"] if value else []
        else:
            values = value if isinstance(value, list) and option["multiple"] else [value]
            if any(isinstance(v, (dict, list, bool)) for v in values):
                raise InputError(f"{path}: {where}: {key} = {value!r} is not a value for --{key}")
            flags += [a for v in values for a in (f"--{key}", str(v))]
    name = entry.get("name") or Path(entry["source"].split(":")[0].split("@")[0]).stem
    try:
        check_bundle_name(str(name))
    except InputError as e:
        raise InputError(f"{path}: {where}: {e.message}", hint='set name = "..."') from None
    target = entry.get("target", DEFAULT_TARGET)
    targets = target if isinstance(target, str) else ",".join(target)
    return Job(str(name), entry["source"], targets, tuple(flags))


def select(jobs: list[Job], only: list[str], target: str | None) -> list[tuple[Job, str | None]]:
    """The jobs named by --only (all when none), each with the --target that narrows it."""
    names = [j.name for j in jobs]
    for name in only:
        if name not in names:
            raise InputError(f"--only {name!r}: no model of that name in the release file", hint=f"one of {', '.join(names)}")
    chosen = [j for j in jobs if not only or j.name in only]
    if target is not None:
        for job in chosen:
            if not set(target.split(",")) <= set(job.target_list()):
                raise InputError(f"--target {target}: not among {job.name}'s targets ({job.targets})")
    return [(job, target) for job in chosen]


def github_matrix(jobs: list[Job]) -> dict:
    """One matrix job per model × target: {"include": [{"model", "target"}, ...]}."""
    return {"include": [{"model": job.name, "target": t} for job in jobs for t in job.target_list()]}


def run_jobs(chosen: list[tuple[Job, str | None]], announce: Callable[[int, Job, list[str]], None]) -> list[dict]:
    """Every export in sequence, each its own process with its own progress on stderr, going on
    past a failure; one record per export, with its --json summary."""
    records = []
    for i, (job, target) in enumerate(chosen):
        argv = job.argv(target)
        announce(i, job, argv)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "edgepack", "export", *argv, "--json"],
                              stdout=subprocess.PIPE, text=True, check=False)
        try:
            summary = json.loads(done.stdout)
        except json.JSONDecodeError:  # killed, or crashed before it could say anything
            summary = {"ok": False, "error": {"message": f"exited {done.returncode} without a summary"}}
        records.append({"name": job.name, "source": job.source, "target": target or job.targets,
                        "argv": ["edgepack", "export", *argv], "exit_code": done.returncode,
                        "seconds": round(time.perf_counter() - start, 1), "summary": summary})
    return records
