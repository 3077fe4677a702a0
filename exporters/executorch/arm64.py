"""The ExecuTorch `.pte` on arm64: a MethodCall (edgepack.cases) backed by edgepack's C++ runner
(arm64_runner/runner.cpp) under qemu, linked against the aarch64 executorch wheel's runtime,
XNNPACK delegate and kernels. The host keeps the golden-case logic (prompts, greedy steps, the
KV positions) and sends each method call to the runner, so what runs on arm64 is exactly the
C++ an app links, and what judges it is exactly the host smoke's code.

The runner implements llama::update_cache and llama::custom_sdpa itself (ExecuTorch ships them
only in a library that links libtorch); RUNNER_OPS says so in every result."""

from __future__ import annotations

import struct
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Sequence

import numpy as np

from edgepack.errors import SmokeFailure
from edgepack.exporters.executorch import RUNNER_OPS

# numpy dtype <-> ExecuTorch ScalarType code (c10's numbering)
_SCALAR_TYPES = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
                 np.dtype(np.int64): 4, np.dtype(np.float16): 5, np.dtype(np.float32): 6,
                 np.dtype(np.float64): 7, np.dtype(np.bool_): 11}
_DTYPES = {code: dtype for dtype, code in _SCALAR_TYPES.items()}
# One forward of a 135M decoder under qemu takes seconds; a runner silent for this long is hung
# (a deadlocked delegate, qemu stuck), and the smoke must end with a verdict rather than wait.
CALL_TIMEOUT_S = 600


class RunnerProcess:
    """One runner process for one .pte; `call(method, inputs)` is a MethodCall. The runtime's log
    goes to a file, read back when a call fails."""

    def __init__(self, argv: list[str], env: dict[str, str], timeout_s: float = CALL_TIMEOUT_S):
        self._log = tempfile.TemporaryFile(prefix="edgepack-et-runner-")
        self._proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._timeout_s, self._timed_out = timeout_s, False

    def __enter__(self) -> "RunnerProcess":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(b"Q")
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        self._log.close()

    def call(self, method: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        request = [b"C", _string(method.encode()), struct.pack("<I", len(inputs))]
        request += [_tensor(np.ascontiguousarray(x)) for x in inputs]
        with self._watchdog(f"{method} call"):
            message = self._answer(b"".join(request))
            if message is not None:
                raise SmokeFailure(f"the ExecuTorch arm64 runner: {message}")
            out = self._proc.stdout
            return [_read_tensor(out) for _ in range(_unpack("<I", out))]

    def operators(self) -> list[str]:
        """The operators registered in the runner (ExecuTorch's kernels and its own)."""
        with self._watchdog("operator listing"):
            message = self._answer(b"K")
            if message is not None:
                raise SmokeFailure(f"the ExecuTorch arm64 runner: {message}")
            return _read_string(self._proc.stdout).split()

    @contextmanager
    def _watchdog(self, what: str):
        """Kill the runner if one request takes longer than the timeout; its pipe then closes and
        the read in progress ends in a SmokeFailure that names the timeout."""
        timer = threading.Timer(self._timeout_s, self._kill_hung)
        timer.start()
        try:
            yield
        except SmokeFailure as e:
            if self._timed_out:
                raise SmokeFailure(f"the ExecuTorch arm64 runner gave no answer to a {what} in "
                                   f"{self._timeout_s:g} s and was stopped") from e
            raise
        finally:
            timer.cancel()

    def _kill_hung(self) -> None:
        self._timed_out = True
        self._proc.kill()

    def _answer(self, request: bytes) -> str | None:
        """Send a request; None when the runner answered OK (the payload follows), else its message."""
        try:
            self._proc.stdin.write(request)
            self._proc.stdin.flush()
            status = self._proc.stdout.read(1)
        except (BrokenPipeError, OSError):
            status = b""
        if not status:
            raise SmokeFailure(f"the ExecuTorch arm64 runner exited with {self._proc.wait()}: {self._tail()}")
        return None if status == b"\0" else _read_string(self._proc.stdout)

    def _tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace").strip()[-1500:]


def _string(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _tensor(x: np.ndarray) -> bytes:
    if x.dtype not in _SCALAR_TYPES:
        raise SmokeFailure(f"the ExecuTorch arm64 runner takes no {x.dtype} inputs")
    return struct.pack(f"<BI{x.ndim}q", _SCALAR_TYPES[x.dtype], x.ndim, *x.shape) + x.tobytes()


def _exact(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise SmokeFailure("the ExecuTorch arm64 runner stopped mid-answer")
    return data


def _unpack(fmt: str, stream: IO[bytes]):
    return struct.unpack(fmt, _exact(stream, struct.calcsize(fmt)))[0]


def _read_string(stream: IO[bytes]) -> str:
    return _exact(stream, _unpack("<I", stream)).decode(errors="replace")


def _read_tensor(stream: IO[bytes]) -> np.ndarray:
    code, rank = struct.unpack("<BI", _exact(stream, 5))
    shape = struct.unpack(f"<{rank}q", _exact(stream, 8 * rank))
    dtype = _DTYPES[code]
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(_exact(stream, count * dtype.itemsize), dtype=dtype).reshape(shape).copy()


def start_on(env, pte: Path) -> RunnerProcess:
    """The runner of the emulated environment `env` (arm64_env.Arm64Env) on `pte`."""
    if not pte.is_file():
        raise SmokeFailure(f"{pte}: the .pte listed in the manifest is missing")
    return RunnerProcess(env.emulate(str(env.runner), str(pte.resolve())), env.environment())


def list_operators(env) -> list[str]:
    """The operators the runner of `env` registers (its self-test; needs no model to load them)."""
    with start_on(env, Path(__file__)) as runner:  # any existing file: the program loads lazily
        return runner.operators()


def self_test(env) -> str:
    """The built runner of `env` registers the LLM operators a .pte needs (its own and ExecuTorch's)."""
    ops = list_operators(env)
    missing = [op for op in (*RUNNER_OPS, "quantized_decomposed::embedding_4bit.out") if op not in ops]
    if missing:
        raise SmokeFailure(f"self-test: the ExecuTorch runner lacks {missing}")
    return f"{Path(env.runner).name} runs, {len(ops)} operators registered"
