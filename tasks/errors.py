"""Errors that end a run with a message for the user instead of a traceback."""

from __future__ import annotations

import signal


class UserInputError(Exception):
    """The user's input is wrong (config, data, model path): exit code 2, nothing registered.

    The message names the config key or file and says what is expected.
    """

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or [message]
        super().__init__(message)

    @classmethod
    def many(cls, header: str, problems: list[str]) -> UserInputError:
        """One error that reports every problem at once, one per line."""
        body = "\n".join(f"  - {p}" for p in problems)
        return cls(f"{header}\n{body}", problems)


class RunFailed(RuntimeError):
    """The run could not finish for a reason its message explains (exit code 1, no traceback)."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM: the run stops, is marked KILLED, and the CLI exits 128 + the signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @staticmethod
    def raise_on(signum: int, frame: object) -> None:
        """A signal handler: raise in the main thread, like Python's own SIGINT handler."""
        raise Interrupted(signum)
