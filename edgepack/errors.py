"""User errors and internal errors are different types; each user error carries its exit code.

Exit codes: 0 everything asked for was produced and passed its checks, 1 some backend, smoke
check or quality gate failed (the bundle is kept aside as NAME.failed/, an earlier NAME/ is left
as it was), 2 bad usage or bad input (including a bundle that does not match its manifest), 3 the
environment a check runs in is missing (the emulated arm64 set-up, adb, Xcode), 4 the output
could not be written (disk full, I/O error): nothing half-written, an earlier bundle untouched.
Anything else escaping is a bug in edgepack.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT_MISSING = 3
EXIT_WRITE_FAILED = 4

# An OSError with one of these is the disk's fault, not the model's or edgepack's.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class EdgepackError(Exception):
    """An error the user can act on. `hint` says what to do about it; `step` names the backend
    lowering step it was raised in, when it was raised in one (lowering.run_steps sets it)."""

    exit_code = EXIT_FAILED
    step: str | None = None

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class InputError(EdgepackError):
    """Bad input: a missing or unreadable model, an unknown option value, an unwritable output."""

    exit_code = EXIT_BAD_INPUT


class UnsupportedModelError(InputError):
    """The model's architecture or shape is outside what edgepack can export."""


class BundleIntegrityError(InputError):
    """A bundle's files do not match its manifest (changed, missing, or outside the bundle)."""


class WriteError(EdgepackError):
    """Writing the output failed for a reason outside the model: a full disk, an I/O error."""

    exit_code = EXIT_WRITE_FAILED


def no_space(error: BaseException) -> OSError | None:
    """The out-of-space OSError behind `error` (itself or a cause), if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return error
        error = error.__cause__ or error.__context__
    return None


def write_error(error: OSError, where: str) -> WriteError:
    """A WriteError for an OSError met while writing `where`."""
    if error.errno in NO_SPACE:
        return WriteError(f"no space left to write {where} ({error.strerror})",
                          hint="free disk space (or choose another --out) and run again; nothing was half-written "
                               "and an earlier bundle is untouched")
    return WriteError(f"could not write {where}: {error.strerror or error}",
                      hint="check the output directory; nothing was half-written and an earlier bundle is untouched")


class BackendError(EdgepackError):
    """A backend's lowering failed; `step` names the step that failed."""

    def __init__(self, backend: str, step: str, message: str, *, hint: str | None = None):
        super().__init__(f"{backend}: step '{step}' failed: {message}", hint=hint)
        self.backend = backend
        self.step = step


class CaptureAltered(EdgepackError):
    """A lowering could not put back the captured weights it wrote over: every backend after it
    would export altered weights, so the run stops here whatever --strict says."""


class RuntimeUnavailableError(EdgepackError):
    """The runtime a check needs is not installed here."""


class TokenizerMismatch(EdgepackError):
    """The on-device runner's tokenizer encodes text differently from the model's own tokenizer."""


class SmokeFailure(EdgepackError):
    """An artifact could not be run the way its golden cases need (the comparison itself is
    recorded in the smoke results, not raised)."""
