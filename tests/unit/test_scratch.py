"""Folders a run holds (edgepack/scratch.py): the kernel's lock on a folder tells a live run's from
one a killed run left, whatever killed it, and only the latter is removed."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from edgepack.scratch import RUN_PREFIX, hold_new_folder, remove_abandoned, run_folder

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_held_folder_stays_and_goes_once_released(tmp_path):
    folder, fd = hold_new_folder(tmp_path, "edgepack-x-")
    (folder / "weights.bin").write_bytes(b"w" * 1000)
    assert folder.name.startswith("edgepack-x-") and [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert remove_abandoned(tmp_path, "edgepack-x-") == []  # held: another open of it cannot take the lock
    assert (folder / "weights.bin").is_file()
    os.close(fd)
    [removed] = remove_abandoned(tmp_path, "edgepack-x-")
    assert (removed.folder, removed.bytes) == (folder, 1000) and not folder.exists()


def test_only_folders_of_the_kind_asked_are_touched(tmp_path):
    (tmp_path / "edgepack-x-old").mkdir()  # unheld: a dead run's
    (tmp_path / "other-x-old").mkdir()
    (tmp_path / "edgepack-x-file").write_text("a file, not a folder")
    assert [r.folder.name for r in remove_abandoned(tmp_path, "edgepack-x-")] == ["edgepack-x-old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edgepack-x-file", "other-x-old"]


def test_a_killed_process_leaves_its_folder_to_the_next_sweep(tmp_path):
    """SIGKILL runs no cleanup; the kernel still drops the lock, which is what the sweep reads."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from edgepack.scratch import hold_new_folder
        folder, fd = hold_new_folder(Path({str(tmp_path)!r}), "edgepack-x-")
        (folder / "part").write_bytes(b"p" * 10)
        print(folder, flush=True)
        time.sleep(600)
        """)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    folder = Path(holder.stdout.readline().strip())
    assert remove_abandoned(tmp_path, "edgepack-x-") == [] and folder.is_dir()  # its process lives
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert folder.is_dir()  # nothing cleaned up
    assert [(r.folder, r.bytes) for r in remove_abandoned(tmp_path, "edgepack-x-")] == [(folder, 10)]


def test_a_run_folder_takes_every_temporary_file_and_goes_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    (tmp_path / f"{RUN_PREFIX}killed").mkdir()
    with run_folder() as removed:
        [folder] = tmp_path.glob(f"{RUN_PREFIX}*")
        assert [r.folder.name for r in removed] == [f"{RUN_PREFIX}killed"]
        assert tempfile.gettempdir() == str(folder) == os.environ["TMPDIR"]
        child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.mkdtemp())"],
                               capture_output=True, text=True, check=True)
        assert Path(child.stdout.strip()).parent == folder  # programs it starts write there too
    assert not list(tmp_path.iterdir())
    assert os.environ["TMPDIR"] == str(tmp_path) and tempfile.gettempdir() == str(tmp_path)
