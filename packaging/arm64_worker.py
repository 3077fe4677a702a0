"""Runs inside the emulated arm64 Python (numpy and the runtimes' aarch64 wheels, no torch, no
jsonschema): replays a bundle's golden cases through the same runtime adapters as the host
(smoke.host_replay) and writes each case's raw outputs to OUT/<backend>/<case>.npz (or the error
to OUT/<backend>/error.txt) and the machine it ran on to OUT/machine.txt; greedy cases twice,
teacher-forced on the backend's reference tokens (<case>.forced.npz) and free-running. Judging
happens on the host, with the host's code.

  python -m edgepack.packaging.arm64_worker BUNDLE OUT BACKEND..."""

from __future__ import annotations

import json
import platform
import sys
import traceback
from pathlib import Path

import numpy as np

from edgepack.packaging.smoke import expected_output, golden_cases, host_replay


def replay_all(bundle: Path, out: Path, backends: list[str]) -> None:
    # The host validated the manifest against its schema before starting this process.
    (out / "machine.txt").write_text(platform.machine())  # the host refuses results not made on aarch64
    manifest = json.loads((bundle / "manifest.json").read_text())
    cases = golden_cases(bundle, manifest)
    for artifact in manifest["artifacts"]:
        backend = artifact["backend"]
        if backend not in backends:
            continue
        folder = out / backend
        folder.mkdir(parents=True)
        try:
            run = host_replay(bundle, artifact)
            for case, refs in cases:
                runs = {case.name: None}
                if case.kind == "greedy":
                    runs[f"{case.name}.forced"] = expected_output(bundle, refs[backend])
                for name, forced in runs.items():
                    actual = run(case, forced)
                    np.savez(folder / f"{name}.npz", **dict(zip(actual.names, actual.arrays)))
        except Exception as e:  # recorded for the host, which reports it as this backend's failure
            (folder / "error.txt").write_text(f"{type(e).__name__}: {e}")
            traceback.print_exc()


if __name__ == "__main__":
    replay_all(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
