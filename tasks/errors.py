"""Errors that end a run with a message for the user instead of a traceback."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from pathlib import Path
from types import FrameType

# A full or read-only disk, or a file past the size the disk (or RLIMIT_FSIZE) allows: retrying cannot help.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
# How SQLite says SQLITE_FULL (the MLflow store's database could not grow, or not write its journal).
SQLITE_FULL = "database or disk is full"


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
    safetensors, SQLite under MLflow) raise their own types and only say so in the message."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return os.strerror(exc.errno)
    text = str(exc)
    if SQLITE_FULL in text:
        return os.strerror(errno.ENOSPC)
    return next((os.strerror(e) for e in DISK_ERRNOS if os.strerror(e) in text), None)


def free_mb(folder: Path) -> float | None:
    """Free MB on the disk holding `folder` (its nearest existing parent), None if unknown."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free / 2**20
            except OSError:
                return None
    return None


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value


def disk_failure(
    exc: BaseException, output_dir: str | Path, reason: str, store: str | Path | None = None, unmarked: bool = False
) -> RunFailed:
    """The message for a run stopped by a full or read-only disk: which place it is (the file written, else the
    fullest of `train.output_dir`, the MLflow store's database and its artifacts), its free space, and what to do.

    `store` is the SQLite file of the MLflow store (None: a tracking server, whose disk is its own); `unmarked`
    says the run could not even be marked FAILED (the next run's start marks it).
    """
    folder = Path(output_dir).resolve()
    places = [("train.output_dir", folder)]
    if store is not None:
        database = Path(store).resolve()
        # After train.output_dir: on one shared disk the output folder is named, as before the store was.
        places += [("the MLflow store", database), ("the MLflow artifacts", database.parent / "artifacts")]
    written = Path(exc.filename) if isinstance(exc, OSError) and isinstance(exc.filename, str) else None
    if store is not None and SQLITE_FULL in str(exc):
        written = places[1][1]  # SQLite's own writes: the database and its journal beside it
    if written is not None:
        where = next(((key, path) for key, path in places if written.resolve().is_relative_to(path)), None)
        key, path = where or ("", written)
    else:  # the writer did not say which file: the place with the least room left
        key, path = min(places, key=lambda place: _or_inf(free_mb(place[1])))
    free = free_mb(path)
    room = f"{free:.1f} MB free" if free is not None else "free space unknown"
    shown = f"{key}: {path}" if key else str(path)
    detail = f" writing {written}" if written is not None and written != path else ""
    if key == "train.output_dir" or store is None:
        fix = "free some space or set train.output_dir elsewhere"
    else:
        fix = (
            f"free some space on the disk holding {path.parent if key == 'the MLflow store' else path} "
            "(or move the store: ADAPTFLOW_MLFLOW_DIR or tracking.uri)"
        )
    marked = "; the run could not be marked FAILED there: the next `adaptflow run` marks it" if unmarked else ""
    return RunFailed(
        f"{reason}{detail} ({shown}, {room}){marked}; {fix}, then `adaptflow run CONFIG --resume` continues this run"
    )


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM: the run stops, is marked KILLED, and the CLI exits 128 + the signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @staticmethod
    def raise_on(signum: int, frame: FrameType | None) -> None:
        """A signal handler: raise in the main thread, like Python's own SIGINT handler.

        Not while a module is being imported: raised inside a C extension's initialization (torch's, through
        pybind11) the exception aborts the whole process ("terminate called after throwing an instance of
        'pybind11::error_already_set'", SIGABRT and a C++ stack dump instead of exit 130). The signal is sent
        again shortly, until it lands outside the import.
        """
        if _importing(frame):
            if signum not in _RESENDING:  # a second Ctrl-C meanwhile is the same interruption
                _RESENDING.add(signum)
                timer = threading.Timer(0.05, _resend, (signum,))
                timer.daemon = True
                timer.start()
            return
        raise Interrupted(signum)


_RESENDING: set[int] = set()


def _resend(signum: int) -> None:
    _RESENDING.discard(signum)
    os.kill(os.getpid(), signum)


def _importing(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside an import (importlib's bootstrap is on the stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False
