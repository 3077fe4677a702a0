"""User errors and internal errors are different types; each user error carries its exit code.

Exit codes: 0 everything asked for was produced and passed its smoke test, 1 some backend or
smoke check failed, 2 bad usage or bad input, 3 the environment a check runs in is missing (the
emulated arm64 set-up, adb, Xcode). Anything else escaping is a bug in edgepack.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT_MISSING = 3


class EdgepackError(Exception):
    """An error the user can act on. `hint` says what to do about it."""

    exit_code = EXIT_FAILED

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


class BackendError(EdgepackError):
    """A backend's lowering failed; `step` names the step that failed."""

    def __init__(self, backend: str, step: str, message: str, *, hint: str | None = None):
        super().__init__(f"{backend}: step '{step}' failed: {message}", hint=hint)
        self.backend = backend
        self.step = step


class RuntimeUnavailableError(EdgepackError):
    """The runtime a check needs is not installed here."""


class TokenizerMismatch(EdgepackError):
    """The on-device runner's tokenizer encodes text differently from the model's own tokenizer."""


class SmokeFailure(EdgepackError):
    """An artifact did not answer like the model it came from."""


class ShapeMismatch(SmokeFailure):
    pass


class ToleranceExceeded(SmokeFailure):
    pass


class TokenMismatch(SmokeFailure):
    pass
