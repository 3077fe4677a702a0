"""Progress on stderr (a spinner per stage and step with its running time, elapsed time when it
ends) and the measurements the summary prints: wall time per stage and step, and the process's
peak resident memory.

While a stage runs, everything written to fds 1 and 2 (converters' native logs as well as Python
prints, warnings, logging and progress bars) goes to a log file instead of the terminal, unless
`verbose`. A stage that succeeds deletes its log; one that fails prints the log's last lines and
keeps it, and says where."""

from __future__ import annotations

import ctypes
import io
import os
import re
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.text import Text

from edgepack.errors import EdgepackError, InputError
from edgepack.rss import peak_rss_bytes, peak_window
from edgepack.scratch import lasting_temp_dir

TAIL_LINES = 25
_TAIL_BYTES = 256 * 1024  # enough for the last lines of even a very chatty converter
_libc = ctypes.CDLL(None)


@dataclass
class StageTiming:
    name: str
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0  # the process's, up to the stage's end
    step_peak_rss_bytes: dict[str, int] = field(default_factory=dict)  # each step's own (Linux)

    def as_dict(self) -> dict:
        return {"name": self.name, "seconds": round(self.seconds, 3),
                "steps": {k: round(v, 3) for k, v in self.steps.items()}, "peak_rss_bytes": self.peak_rss_bytes,
                "step_peak_rss_bytes": dict(self.step_peak_rss_bytes)}


@dataclass
class Running:
    """The spinner's text: what runs and for how long, rendered again at each refresh (a lowering
    step can take twenty minutes with nothing else to show)."""

    label: str
    start: float = field(default_factory=time.perf_counter)

    def __rich__(self) -> str:
        minutes, seconds = divmod(int(time.perf_counter() - self.start), 60)
        return f"{self.label}… [dim]{minutes}:{seconds:02d}[/]"


class _Stage:
    def __init__(self, timing: StageTiming, status):
        self.timing, self._status = timing, status
        self._step: str | None = None
        self._step_start = 0.0
        self._step_window = ExitStack()  # holds the open step's peak_window
        self.failed = False
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        """A remark for the stage's line (e.g. "from the cache"), after its steps."""
        self.notes.append(text)

    def step(self, name: str) -> None:
        """Mark the start of a named step inside the stage (closing the previous one)."""
        self._close_step()
        self._step, self._step_start = name, time.perf_counter()
        self._window = self._step_window.enter_context(peak_window())
        if self._status is not None:
            self._status.update(Running(f"[bold]{self.timing.name}[/] › {name}"))

    def mark_failed(self) -> None:
        """The stage failed without raising (e.g. a smoke check recorded a failure): it ends with ✗
        and keeps its output log like a stage that raised."""
        self.failed = True

    def _close_step(self) -> None:
        if self._step is not None:
            self.timing.steps[self._step] = time.perf_counter() - self._step_start
            self._step_window.close()
            if self._window.peak_bytes:
                self.timing.step_peak_rss_bytes[self._step] = self._window.peak_bytes
            self._step = None


def _flush(*streams) -> None:
    """Push what Python and C stdio still buffer to the fds, so it lands where they point now."""
    for stream in streams:
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # a closed or write-only-in-name stream
            pass
    _libc.fflush(None)  # native code's printf/std::cout buffers


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # StringIO, CliRunner's streams
        return None


@contextmanager
def _console_kept_visible(console: Console):
    """While fds 1 and 2 point at a log, the console goes on writing where it wrote before: to a
    dup of the original fd when it wrote to fd 1 or 2, else to the stream it wrote to then (under
    typer's CliRunner, its own stderr), not to whatever sys.stderr becomes meanwhile."""
    own_file = console._file  # None: rich looks sys.stderr / sys.stdout up at each write
    target = console.file
    fd = _fileno(target)
    dup = None
    if fd in (1, 2):
        _flush(target)
        dup = open(os.dup(fd), "w", buffering=1, encoding=getattr(target, "encoding", None) or "utf-8",
                   errors="replace")
    console.file = dup or target
    try:
        yield
    finally:
        console.file = own_file
        if dup is not None:
            dup.close()


@contextmanager
def _output_to(log_fd: int):
    """fds 1 and 2, and sys.stdout / sys.stderr, write to `log_fd`; all restored on the way out."""
    streams = sys.stdout, sys.stderr
    _flush(*streams)
    saved = os.dup(1), os.dup(2)
    log_stream = open(log_fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # Python-level writers that do not go through fds 1 and 2 (sys.stderr replaced by a test
        # runner, or by rich's spinner, which would print them above itself) write here too.
        sys.stdout = sys.stderr = log_stream
        yield
    finally:
        sys.stdout, sys.stderr = streams
        _flush(log_stream, *streams)  # loggers keep references to the original streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        log_stream.close()


def log_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of a captured log as a terminal would have shown them (a progress bar's
    carriage-return redraws reduced to the last), runs of one repeated line folded into one."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
        text = f.read().decode("utf-8", errors="replace")
    shown: list[str] = []
    repeats: list[int] = []
    for raw in text.splitlines():
        line = raw.rstrip("\r").rsplit("\r", 1)[-1]
        if shown and line == shown[-1]:
            repeats[-1] += 1
        else:
            shown.append(line)
            repeats.append(1)
    return [line if n == 1 or not line.strip() else f"{line}  [× {n}]" for line, n in zip(shown, repeats)][-lines:]


@dataclass
class _Log:
    path: Path
    failed: bool = False
    kept: bool = False

    def keep(self) -> None:
        """Move the log out of the run's temporary folder, which goes with the run, into the
        temporary directory itself. Until then a killed run's log goes with its folder."""
        lasting = Path(lasting_temp_dir()) / self.path.name
        if self.path != lasting:
            os.replace(self.path, lasting)
            self.path = lasting


class Progress:
    def __init__(self, console: Console | None = None, quiet: bool = False, verbose: bool = False,
                 log_label: str = "edgepack"):
        """verbose: let converters' own output through to the terminal instead of capturing it.
        log_label: names a failed stage's kept log (the bundle's name)."""
        self.console = console or Console(stderr=True)
        self.quiet, self.verbose = quiet, verbose
        self.log_label = log_label
        self.timings: list[StageTiming] = []

    @contextmanager
    def stage(self, name: str):
        timing = StageTiming(name)
        self.timings.append(timing)
        start = time.perf_counter()
        status = None if self.quiet else self.console.status(Running(f"[bold]{name}[/]"))
        stage = _Stage(timing, status)
        if status is not None:
            status.start()  # before the capture, so the capture's stdout hook is undone before the spinner's
        ok, log = False, None
        try:
            with self.captured(name) as log:
                yield stage
                if log is not None:
                    log.failed = stage.failed
            ok = not stage.failed
        finally:
            stage._close_step()
            if status is not None:
                status.stop()
            timing.seconds = time.perf_counter() - start
            timing.peak_rss_bytes = peak_rss_bytes()
            if not self.quiet:
                mark = "[green]✓[/]" if ok else "[red]✗[/]"
                steps = ", ".join([*(f"{k} {v:.1f}s" for k, v in timing.steps.items()), *stage.notes])
                self.console.print(f"{mark} {name:<20} {timing.seconds:7.1f} s" + (f"  [dim]({steps})[/]" if steps else ""))
                if log is not None and log.kept:
                    for line in log_tail(log.path):
                        self.console.print(Text("  ") + Text.from_ansi(line, style="dim"), soft_wrap=True)
                    self.console.print(f"  [dim]full converter output of {name}:[/] {log.path}", highlight=False, soft_wrap=True)

    @contextmanager
    def captured(self, name: str):
        """fds 1 and 2 go to a log while the block runs (unless verbose), with no stage line: the
        log is deleted, or kept when the block fails (raises, or sets the yielded log's `failed`)
        and wrote something; a failing EdgepackError's hint then names it."""
        if self.verbose:
            yield None
            return
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.log_label}-{name}")
        fd, path = tempfile.mkstemp(prefix=f"edgepack-{slug}-", suffix=".log")
        log = _Log(Path(path))
        try:
            with _console_kept_visible(self.console), _output_to(fd):
                yield log
        except BaseException as e:
            if isinstance(e, InputError):  # the user's input failed, not a converter: its chatter is noise
                raise
            log.failed = True
            if _has_output(log.path):
                log.keep()
                where = f"full converter output in {log.path}"
                if isinstance(e, EdgepackError):
                    e.hint = f"{e.hint}; {where}" if e.hint else where
                else:
                    e.add_note(where)
            raise
        finally:
            os.close(fd)
            log.kept = log.failed and _has_output(log.path)
            if log.kept:
                log.keep()
            else:
                log.path.unlink(missing_ok=True)


def _has_output(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0
