"""Folders a run holds while it lives, and the removal of those a killed run left behind.

A run that ends removes its temporary folders, and so does one stopped by Ctrl-C or SIGTERM
(cli.main). SIGKILL, the kernel's out-of-memory killer or a power cut give it no chance, and a 1B
model's temporary weights are gigabytes, its staged bundle as much again. So such a folder is held:
the run keeps an exclusive flock on the folder itself, which the kernel releases however the
process ends. A folder of the same kind whose lock can be taken belongs to no live run, on this
machine or any other sharing the file system, and the next run removes it."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

RUN_PREFIX = "edgepack-run-"  # every temporary file of a CLI run goes in one such folder under TMPDIR
_outside: list[str] = []  # the temporary directory the run folder is in, while one is in use


@dataclass(frozen=True)
class Removed:
    folder: Path
    bytes: int


def hold_new_folder(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new folder `parent/<prefix>XXXXXXXX` and the descriptor whose lock holds it until closed.
    It is made and locked under a name no sweep matches, then renamed, so no sweep sees it unlocked."""
    claiming = f".claiming-{prefix}"
    staging = Path(tempfile.mkdtemp(prefix=claiming, dir=parent))
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        folder = parent / f"{prefix}{staging.name.removeprefix(claiming)}"
        os.rename(staging, folder)
    except BaseException:
        os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder, fd


def remove_abandoned(parent: Path, prefix: str) -> list[Removed]:
    """Remove the folders `parent/<prefix>*` that no live run holds (their lock can be taken)."""
    removed = []
    for folder in sorted(parent.glob(glob.escape(prefix) + "*")):
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # not a folder, or another run removed it meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a live run's
            continue
        try:
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())  # held: nothing else changes it
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(Removed(folder, size))
        finally:
            os.close(fd)
    return removed


@contextmanager
def run_folder() -> Iterator[list[Removed]]:
    """Point every temporary file of this process and of the programs it starts (TMPDIR) at one
    held folder under the current temporary directory, removed when the block ends; first remove
    the folders killed runs left there. Yields what was removed."""
    parent = Path(tempfile.gettempdir())
    removed = remove_abandoned(parent, RUN_PREFIX)
    folder, fd = hold_new_folder(parent, RUN_PREFIX)
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    _outside.append(str(parent))
    tempfile.tempdir = os.environ["TMPDIR"] = str(folder)
    try:
        yield removed
    finally:
        _outside.pop()
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def lasting_temp_dir() -> str:
    """Where a file the user is told to read after the run (a failed stage's log) goes: the
    temporary directory itself, not the run folder that goes with the run."""
    return _outside[-1] if _outside else tempfile.gettempdir()
