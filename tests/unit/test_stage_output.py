"""How a stage's output is handled, on small blocks of code: captured to a log, shown on failure or with --verbose, repeats folded, the spinner drawn during the stage, and the streams restored after an interrupt."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest
from rich.console import Console

from edgepack.errors import BackendError, InputError
from edgepack.progress import TAIL_LINES, Progress

MARKERS = ("native-out", "native-err", "c-printf", "print-out", "print-err", "logged-err")


def _chatter() -> None:
    """What converters do: native writes (unbuffered and C stdio), print, logging."""
    os.write(1, b"native-out\n")
    os.write(2, b"native-err\n")
    ctypes.CDLL(None).printf(b"c-printf\n")  # sits in C stdio's buffer when fd 1 is not a terminal
    print("print-out")
    print("print-err", file=sys.stderr)
    logging.getLogger("edgepack-test-converter").warning("logged-err")


@pytest.fixture
def logs_dir(tmp_path, monkeypatch) -> Path:
    """Where the stage logs go (the temp dir), private to the test."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture
def converter_logger():
    """A logger whose handler holds the stream sys.stderr was when it was set up, as libraries do."""
    logger = logging.getLogger("edgepack-test-converter")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    yield logger
    logger.removeHandler(handler)


def _fd2_console() -> Console:
    """A console on fd 2 itself, like the CLI's in a terminal (under pytest sys.stderr is not fd 2)."""
    return Console(file=open(2, "w", closefd=False), width=200)


@pytest.mark.parametrize("console", [_fd2_console, lambda: Console(stderr=True, width=200)], ids=["fd2", "sys.stderr"])
def test_stage_output_goes_to_a_log_and_the_stage_line_stays(capfd, logs_dir, converter_logger, console):
    progress = Progress(console())
    with progress.stage("lower demo") as stage:
        stage.step("convert")
        _chatter()
    out, err = capfd.readouterr()
    assert out == ""
    assert not [m for m in MARKERS if m in err], err
    assert "✓ lower demo" in err and "convert" in err
    assert list(logs_dir.iterdir()) == []  # a stage that succeeded leaves no log
    os.write(2, b"after\n")  # and fd 2 is the terminal's again
    assert capfd.readouterr().err == "after\n"


def test_the_spinner_goes_on_drawing_on_the_terminal_during_the_stage(capfd, logs_dir):
    console = Console(file=open(2, "w", closefd=False), force_terminal=True, width=200)
    with Progress(console).stage("lower demo") as stage:
        stage.step("convert")
        os.write(2, b"native-err\n")
        time.sleep(0.5)  # the spinner redraws ~12 times a second, while fd 2 is the log
    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capfd.readouterr().err)
    # drawn during the stage, not only once more when it stops
    assert err.count("lower demo › convert…") >= 2 and "native-err" not in err


def test_verbose_lets_converter_output_through(capfd, logs_dir, converter_logger):
    with Progress(_fd2_console(), verbose=True).stage("lower demo"):
        _chatter()
    out, err = capfd.readouterr()
    assert all(m in out for m in ("native-out", "c-printf", "print-out")), out
    assert all(m in err for m in ("native-err", "print-err", "logged-err", "✓ lower demo")), err
    assert list(logs_dir.iterdir()) == []


@pytest.mark.parametrize("error", [BackendError("demo", "convert", "it broke"), RuntimeError("it broke")])
def test_a_failed_stage_prints_the_tail_and_keeps_the_whole_log(capfd, logs_dir, error):
    with pytest.raises(type(error)):
        with Progress(_fd2_console(), log_label="tiny-llama").stage("lower demo"):
            for i in range(100):
                os.write(2 if i % 2 else 1, f"converter line {i}\n".encode())
            raise error
    out, err = capfd.readouterr()
    [log] = logs_dir.iterdir()
    assert log.name.startswith("edgepack-tiny-llama-lower-demo-")
    assert log.read_text().splitlines() == [f"converter line {i}" for i in range(100)]
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith("✗ lower demo")
    assert [line.strip() for line in lines[1:-1]] == [f"converter line {i}" for i in range(100 - TAIL_LINES, 100)]
    assert str(log) in lines[-1]
    if isinstance(error, BackendError):  # the hint the CLI prints names the log
        assert str(log) in error.hint and str(log) in str(error)


def test_a_stage_marked_failed_keeps_its_log_and_repeats_are_folded(capfd, logs_dir):
    with Progress(_fd2_console()).stage("smoke") as stage:
        for _ in range(40):
            os.write(2, b"[kernel_runtime_context.h:91] No temp allocator provided\n")
        os.write(2, b"smoke check failed\n")
        stage.mark_failed()
    err = capfd.readouterr().err
    [log] = logs_dir.iterdir()
    assert len(log.read_text().splitlines()) == 41
    assert "✗ smoke" in err and "No temp allocator provided  [× 40]" in err and "smoke check failed" in err


def test_a_captured_block_prints_nothing_and_names_its_log_in_the_hint(capfd, logs_dir):
    """The option check before the first stage (backend imports chatter there) has no stage line."""
    progress = Progress(_fd2_console(), log_label="tiny-llama")
    with progress.captured("check"):
        os.write(2, b"import chatter\n")
    assert capfd.readouterr() == ("", "") and list(logs_dir.iterdir()) == []
    with pytest.raises(InputError) as raised:  # bad input: the converters' chatter is not the story
        with progress.captured("check"):
            os.write(2, b"import chatter\n")
            raise InputError("--ios-target 16 is not supported", hint="choose one of 17, 18")
    assert raised.value.hint == "choose one of 17, 18" and list(logs_dir.iterdir()) == []
    with pytest.raises(BackendError) as raised:
        with progress.captured("check"):
            os.write(2, b"import chatter\n")
            raise BackendError("coreml", "import", "no module named coremltools")
    [log] = logs_dir.iterdir()
    assert raised.value.hint == f"full converter output in {log}"
    assert log.read_text() == "import chatter\n" and capfd.readouterr() == ("", "")


def test_fds_and_streams_are_restored_after_an_interrupt(capfd, logs_dir):
    before = [os.fstat(fd) for fd in (1, 2)]
    streams, console = (sys.stdout, sys.stderr), Console(stderr=True)
    with pytest.raises(KeyboardInterrupt):
        with Progress(console).stage("load"):
            os.write(2, b"half-written\n")
            raise KeyboardInterrupt
    assert [(s.st_dev, s.st_ino) for s in (os.fstat(1), os.fstat(2))] == [(s.st_dev, s.st_ino) for s in before]
    assert (sys.stdout, sys.stderr) == streams
    assert console.file is sys.stderr  # rich looks sys.stderr up again at each write
    assert "half-written" in next(logs_dir.iterdir()).read_text()
    print("visible")
    assert "visible" in capfd.readouterr().out



def test_a_failed_stage_log_outlives_the_run_folder(capfd, logs_dir, monkeypatch):
    """A CLI run's temporary files go in its run folder (edgepack/scratch.py), removed at the end;
    the log a failure's hint names goes beside it, in the temp dir, so the user can still read it."""
    from edgepack.scratch import run_folder

    monkeypatch.setenv("TMPDIR", str(logs_dir))
    with run_folder(), pytest.raises(BackendError) as raised:
        with Progress(_fd2_console()).captured("check"):
            os.write(2, b"converter trace\n")
            raise BackendError("coreml", "import", "no module named coremltools")
    [log] = logs_dir.iterdir()
    assert raised.value.hint == f"full converter output in {log}" and log.read_text() == "converter trace\n"


def test_the_spinner_shows_how_long_the_step_has_run(logs_dir):
    """A long step (ExecuTorch's lowering can take twenty minutes) shows its running time, counted
    from the step's start, not the stage's, and redrawn while nothing else happens."""
    import io

    out = io.StringIO()
    progress = Progress(Console(file=out, force_terminal=True, width=100))
    with progress.stage("lower executorch") as stage:
        time.sleep(1.2)
        stage.step("lower")
        time.sleep(1.2)
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # as a terminal shows it
    assert "lower executorch… 0:01" in frames
    assert "lower executorch › lower… 0:00" in frames and "lower executorch › lower… 0:01" in frames
    assert "lower executorch › lower… 0:02" not in frames
