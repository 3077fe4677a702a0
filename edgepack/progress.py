"""Progress on stderr (a spinner per stage, elapsed time when it ends) and the measurements the
summary prints: wall time per stage and step, and the process's peak resident memory."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@dataclass
class StageTiming:
    name: str
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0

    def as_dict(self) -> dict:
        return {"name": self.name, "seconds": round(self.seconds, 3),
                "steps": {k: round(v, 3) for k, v in self.steps.items()}, "peak_rss_bytes": self.peak_rss_bytes}


class _Stage:
    def __init__(self, timing: StageTiming, status):
        self.timing, self._status = timing, status
        self._step: str | None = None
        self._step_start = 0.0

    def step(self, name: str) -> None:
        """Mark the start of a named step inside the stage (closing the previous one)."""
        self._close_step()
        self._step, self._step_start = name, time.perf_counter()
        if self._status is not None:
            self._status.update(f"[bold]{self.timing.name}[/] › {name}…")

    def _close_step(self) -> None:
        if self._step is not None:
            self.timing.steps[self._step] = time.perf_counter() - self._step_start
            self._step = None


class Progress:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.timings: list[StageTiming] = []

    @contextmanager
    def stage(self, name: str):
        timing = StageTiming(name)
        self.timings.append(timing)
        start = time.perf_counter()
        status = None if self.quiet else self.console.status(f"[bold]{name}[/]…")
        stage = _Stage(timing, status)
        if status is not None:
            status.start()
        ok = False
        try:
            yield stage
            ok = True
        finally:
            stage._close_step()
            if status is not None:
                status.stop()
            timing.seconds = time.perf_counter() - start
            timing.peak_rss_bytes = peak_rss_bytes()
            if not self.quiet:
                mark = "[green]✓[/]" if ok else "[red]✗[/]"
                steps = ", ".join(f"{k} {v:.1f}s" for k, v in timing.steps.items())
                self.console.print(f"{mark} {name:<20} {timing.seconds:7.1f} s" + (f"  [dim]({steps})[/]" if steps else ""))
