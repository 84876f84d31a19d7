"""Errors that end a run with a message for the user instead of a traceback."""

from __future__ import annotations


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


def capped(values: list[str], limit: int = 20) -> str:
    """A list for a message, cut after `limit` items: "['a', 'b'] … 5 more" (200 labels would bury the point)."""
    shown = repr(values[:limit])
    return shown if len(values) <= limit else f"{shown} … {len(values) - limit} more"


class RunFailed(RuntimeError):
    """The run could not finish for a reason its message explains (exit code 1, no traceback)."""

    exit_code = 1
