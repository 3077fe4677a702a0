"""Run a backend's lowering as an ordered tuple of named steps, and say which one failed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from edgepack.errors import BackendError, EdgepackError


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Any], None]  # reads and sets attributes of the lowering's work object


def run_steps(backend: str, steps: tuple[Step, ...], work: Any,
              on_step: Callable[[str], None] | None = None) -> Any:
    for step in steps:
        if on_step:
            on_step(step.name)
        try:
            step.run(work)
        except EdgepackError:
            raise
        except Exception as e:  # a converter's own exception: keep it, name the step
            raise BackendError(backend, step.name, f"{type(e).__name__}: {e}",
                               hint="run with --verbose for the full traceback") from e
    return work
