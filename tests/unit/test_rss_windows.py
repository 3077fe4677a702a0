"""Peak RSS windows (edgepack.rss): the kernel keeps one high-water mark per process, which each
window resets on entry; a window that encloses another still sees the inner block's peak, and each
step of a stage reports its own peak (what the scale bench reads to say where memory goes)."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
from rich.console import Console

from edgepack.progress import Progress
from edgepack.rss import _status_bytes, peak_rss_bytes, peak_window

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the kernel's high-water mark is read on Linux")
BLOCK = 256 << 20


def _hold_block() -> None:
    """BLOCK bytes of fresh pages, each written (so resident), then unmapped. An anonymous map, not
    the heap: after a long test session an allocator may hand out pages that are resident already."""
    block = mmap.mmap(-1, BLOCK)
    for page in range(0, BLOCK, mmap.PAGESIZE):
        block[page] = 1
    block.close()


@pytest.fixture(autouse=True)
def _kernel_resets_the_mark():
    """The kernel must lower this process's high-water mark when asked (/proc/self/clear_refs):
    once, in a long-lived CI test worker, the mark stayed where it was (1.73 GB) through every reset."""
    _hold_block()
    Path("/proc/self/clear_refs").write_text("5")
    if _status_bytes("VmHWM") >= _status_bytes("VmRSS") + BLOCK // 2:
        pytest.skip("this process's high-water mark does not reset; the windows cannot be observed here")


def test_an_enclosing_window_keeps_the_peak_a_nested_one_reset():
    with peak_window() as outer:
        with peak_window() as inner:
            _hold_block()
        with peak_window() as after:
            pass
    assert inner.peak_bytes > after.peak_bytes + BLOCK * 0.9
    assert outer.peak_bytes >= inner.peak_bytes
    assert peak_rss_bytes() >= inner.peak_bytes  # the process's peak survives every reset


def test_each_step_of_a_stage_records_its_own_peak():
    with Progress(Console(file=open("/dev/null", "w")), quiet=True).stage("lower demo") as stage:
        stage.step("allocate")
        _hold_block()
        stage.step("idle")
    peaks = stage.timing.step_peak_rss_bytes
    assert set(peaks) == {"allocate", "idle"}
    assert peaks["allocate"] > peaks["idle"] + BLOCK * 0.9
    assert stage.timing.as_dict()["step_peak_rss_bytes"] == peaks
