"""Errors that end a run with a message for the user instead of a traceback."""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path

# A full or read-only disk: retrying cannot help.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


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


def disk_error(exc: BaseException) -> str | None:
    """The reason when `exc` comes from a full or read-only disk, else None. Some writers (pyarrow,
    safetensors) raise their own types and only say so in the message."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return os.strerror(exc.errno)
    text = str(exc)
    return next((os.strerror(e) for e in DISK_ERRNOS if os.strerror(e) in text), None)


def disk_failure(exc: BaseException, output_dir: str | Path, reason: str) -> RunFailed:
    """The message for a run stopped by a full or read-only disk: the file, `train.output_dir` and its free space."""
    folder = Path(output_dir).resolve()
    written = f" writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return RunFailed(
        f"{reason}{written} (train.output_dir: {folder}, {free}); free some space or set train.output_dir "
        "elsewhere, then `adaptflow run CONFIG --resume` continues this run"
    )


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM: the run stops, is marked KILLED, and the CLI exits 128 + the signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @staticmethod
    def raise_on(signum: int, frame: object) -> None:
        """A signal handler: raise in the main thread, like Python's own SIGINT handler."""
        raise Interrupted(signum)
