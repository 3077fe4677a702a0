"""The process's resident memory: its peak over the whole run, and a block's own peak (what the
smoke measures while a runtime loads and runs an artifact); and the memory the machine grants it.
Standard library only: the emulated arm64 Python imports the smoke's code through this module."""

from __future__ import annotations

import os
import re
import resource
import sys
from contextlib import contextmanager
from pathlib import Path

_EARLIER_PEAK = 0  # the process's peak before measure_rss reset the kernel's (which getrusage reads)


def peak_rss_bytes() -> int:
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


@contextmanager
def measure_rss():
    """Measures the block: the process's resident set before it and its peak during it, filled into
    the yielded dict on exit. Linux only (the kernel's high-water mark, reset on entry through
    /proc/self/clear_refs; peak_rss_bytes keeps the earlier peak); elsewhere the dict stays empty."""
    global _EARLIER_PEAK
    record: dict[str, int] = {}
    try:
        before = _status_bytes("VmRSS")
        _EARLIER_PEAK = peak_rss_bytes()
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, TypeError):  # not Linux, or /proc not readable or writable here
        yield record
        return
    yield record
    record.update(rss_before_bytes=before, peak_rss_bytes=_status_bytes("VmHWM"))
