"""Converters' own output (native writes to fds 1 and 2, Python prints, warnings, logging) goes to a
per-stage log while edgepack's stage lines stay on the terminal; --verbose lets it through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT


def test_a_real_process_keeps_stdout_for_its_own_output(tmp_path):
    """Real fds, Python's own warnings machinery, C stdio buffering: stdout holds only what the
    program prints after its stages, stderr only the stage line."""
    script = textwrap.dedent("""
        import ctypes, os, sys, warnings
        from edgepack.progress import Progress
        with Progress().stage("lower demo"):
            warnings.warn("converter-warning", FutureWarning)
            ctypes.CDLL(None).printf(b"c-printf\\n")
            os.write(2, b"native-err\\n")
        print('{"ok": true}')
    """)
    # Without PYTHONUNBUFFERED, C stdio buffers printf's output when fd 1 is a pipe.
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": True}
    assert "✓ lower demo" in result.stderr
    assert not [m for m in ("converter-warning", "c-printf", "native-err") if m in result.stderr], result.stderr
    assert list(tmp_path.iterdir()) == []


# Seen on `edgepack export --target onnx`: tokenizers' C++ log (native, fd 2), torchao's load
# failures, torch's logging, and Python warnings from the ONNX exporter.
CONVERTER_LINES = ("regex.cpp", "Failed to load", "torchvision is not installed", "UserWarning")


@pytest.mark.slow  # two real exports (ONNX, the fastest backend) side by side: ~30 s on 2 cores
def test_export_keeps_converter_output_off_the_terminal_unless_verbose(llama_dir, tmp_path):
    def export(out: str, *extra: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "edgepack", "export", str(llama_dir), "--target", "onnx",
                   "--out", str(tmp_path / out), "--json", *extra]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                                env={**os.environ, "TMPDIR": str(tmp_path)})

    runs = {"quiet": export("quiet"), "verbose": export("verbose", "--verbose")}
    (quiet_out, quiet_err), (verbose_out, verbose_err) = (p.communicate(timeout=300) for p in runs.values())
    assert [p.returncode for p in runs.values()] == [0, 0], quiet_err + verbose_err
    for out in (quiet_out, verbose_out):  # the JSON summary is all there is on stdout
        assert json.loads(out)["ok"] is True
    for err in (quiet_err, verbose_err):
        assert all(f"✓ {s}" in err for s in ("load", "capture", "lower onnx", "package", "smoke", "archive")), err
    assert [line for line in CONVERTER_LINES if line in quiet_err] == [], quiet_err
    assert [line for line in CONVERTER_LINES if line not in verbose_err] == [], verbose_err
    assert not list(tmp_path.glob("edgepack-*.log"))

