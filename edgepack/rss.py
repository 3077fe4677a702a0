"""The process's resident memory: its peak over the whole run, and a block's own peak (what the
smoke measures while a runtime loads and runs an artifact); and the memory the machine grants it.
Standard library only: the emulated arm64 Python imports the smoke's code through this module."""

from __future__ import annotations

import mmap
import os
import re
import resource
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

_EARLIER_PEAK = 0  # the process's peak before a window reset the kernel's (VmHWM)
_OPEN_WINDOWS: list["PeakWindow"] = []  # one kernel high-water mark: before each reset, every open window reads it


def peak_rss_bytes() -> int:
    """This process's peak resident set. On Linux the kernel's high-water mark of its own address
    space (VmHWM): getrusage's ru_maxrss also counts the peak of the process that started it (a
    child started by vfork and exec inherits it), and a benchmark that had built a 1B model before
    starting each export read 10.6 GiB from every one of them."""
    try:
        return max(_EARLIER_PEAK, _status_bytes("VmHWM"))
    except (OSError, TypeError):  # not Linux, or /proc not readable here
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(_EARLIER_PEAK, peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def machine_memory_bytes() -> int:
    """The physical memory, or the container's limit where one is set lower (cgroup v2's
    memory.max; a CI runner's is often below the host's)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def _status_bytes(field_name: str) -> int:
    return int(re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]) * 1024


class PeakWindow:
    """The peak resident set over a block, nested blocks included: `peak_bytes` once it closes."""

    def __init__(self) -> None:
        self.peak_bytes = 0

    def _seen(self) -> None:
        self.peak_bytes = max(self.peak_bytes, _status_bytes("VmHWM"))


@contextmanager
def peak_window():
    """A PeakWindow over the block. Linux only (the kernel's high-water mark, reset on entry through
    /proc/self/clear_refs, each open window and peak_rss_bytes keeping what they had seen); elsewhere
    its peak stays 0."""
    global _EARLIER_PEAK
    window = PeakWindow()
    try:
        for open_window in _OPEN_WINDOWS:
            open_window._seen()
        _EARLIER_PEAK = peak_rss_bytes()
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, TypeError):  # not Linux, or /proc not readable or writable here
        yield window
        return
    _OPEN_WINDOWS.append(window)
    try:
        yield window
    finally:
        _OPEN_WINDOWS.remove(window)
        window._seen()


@contextmanager
def measure_rss():
    """Measures the block: the process's resident set before it and its peak during it, filled into
    the yielded dict on exit (Linux only; elsewhere the dict stays empty)."""
    record: dict[str, int] = {}
    try:
        before = _status_bytes("VmRSS")
    except (OSError, TypeError):
        yield record
        return
    with peak_window() as window:
        yield record
    if window.peak_bytes:
        record.update(rss_before_bytes=before, peak_rss_bytes=window.peak_bytes)


@contextmanager
def released_pages(mapped: mmap.mmap, every_s: float = 0.25):
    """Let go of `mapped`'s resident pages every `every_s` seconds while the block reads it (and
    once after). The mapping is a file's, read-only: a page let go is read again from the page
    cache when next touched, so what the block sees is unchanged, and a file the block reads
    through once (a float model the quantizer rounds) is not all resident in this process at the
    end of it."""
    if not hasattr(mapped, "madvise"):  # Windows: the pages stay until the mapping goes
        yield
        return
    stop = threading.Event()

    def release() -> None:
        while not stop.wait(every_s):
            mapped.madvise(mmap.MADV_DONTNEED)

    thread = threading.Thread(target=release, name="released-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        mapped.madvise(mmap.MADV_DONTNEED)
