"""The one base class of every error llmprune reports to a user, and the exit codes they map to.

`LlmpruneError` is what the CLI catches (and only it, plus KeyboardInterrupt): anything else is an
internal bug and keeps its traceback. Two kinds, told apart by `exit_code`:
- 2, usage errors: what was typed or given is wrong (a flag, a recipe, a plan, a path, a malformed
  file); nothing expensive has run yet, and the message says what to change.
- 1, run failures: the inputs were fine but the run failed (network, Hub, a download, a save that
  did not verify).
A raise site may override the class default: `ModelLoadError(msg, exit_code=1)` for a network failure.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class LlmpruneError(Exception):
    """Base of all user-facing errors; `exit_code` is what the CLI returns."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, *args: object, exit_code: int | None = None) -> None:
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(LlmpruneError, ValueError):
    """A bad argument or input, caught before any expensive work (exit 2)."""

    exit_code = EXIT_USAGE


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so cleanup (finally / except BaseException) runs as for Ctrl-C."""


__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE", "LlmpruneError",
           "Terminated", "UsageError"]
