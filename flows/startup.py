"""How every `adaptflow` command starts and ends, in one place.

`session` wraps a command: the process settings of `process_tuning` (before the command imports torch),
SIGINT / SIGTERM raised as `Interrupted`, Prefect's temporary server started at once for a command that runs
flows (`temporary_server`), logging, and the outcome: exit code 0 ok, 2 bad input, 1 anything else, 128 + the
signal when interrupted, and with --json one JSON object as the last stdout line (everything else on stderr).

`connect` is what a command opens before its work, once its own input has been checked: the MLflow store, and
for a command that runs flows the temporary server, waited for while the store opens.

The CLI (`entry`, `main`, every subcommand, `serve` included) and the tests that call `main` start this way;
Prefect's runner subprocesses and Dask workers inherit the process settings through the environment.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows import process_tuning, temporary_server
from tasks.errors import Interrupted, RunFailed, UserInputError, disk_error

if TYPE_CHECKING:
    from tasks.config import TrackingSettings

# Prefect's loggers of flow and task runs: where it logs a run's exception.
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class QuietExplainedErrors(logging.Filter):
    """Prefect logs a task's or flow's exception with its traceback at ERROR; for a UserInputError or a RunFailed
    (a grid whose trials all failed, a diverged loss), or a full disk (named once, by its path, at the end) that
    reads as a crash before the one clean message the session prints. Such records, and the "Finished in state
    Failed(...)" lines that repeat a full disk's raw error, become DEBUG: shown (traceback and all) only when
    Prefect's run loggers are at DEBUG (PREFECT_LOGGING_LEVEL=DEBUG), else dropped."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        explained = isinstance(error, UserInputError | RunFailed) or (error is not None and disk_error(error))
        if explained or disk_error(Exception(record.getMessage())):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.logger.isEnabledFor(logging.DEBUG)
        return True


# MLflow's SQLite store logs every failed statement with its traceback before raising it: on a full disk, one
# per write (dozens in a run). The error itself still reaches the run, which names the full place once.
MLFLOW_STORE_LOGGER = "mlflow.store.db.utils"


class QuietFullStore(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and disk_error(error))


@dataclass
class Outcome:
    """What a command ends with: its result (the JSON object) and exit code."""

    command: str
    result: dict[str, Any] = field(default_factory=dict)
    code: int = 0


@contextlib.contextmanager
def session(command: str, *, runs_flows: bool, json_output: bool, resume_hint: str = "") -> Iterator[Outcome]:
    """Start a command the one way every command starts; the body sets `outcome.result`.

    An exception in the body ends the command with its exit code and message (not re-raised); `resume_hint`
    is added to the message of an interrupted run.
    """
    process_tuning.tune_process()  # first: before the command imports torch
    outcome = Outcome(command)
    with contextlib.ExitStack() as stack:
        _handle_signals(stack)
        if runs_flows:
            temporary_server.start_early()  # before anything imports Prefect
        _configure_logging()
        stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr) if json_output else contextlib.nullcontext():
            try:
                yield outcome
            except UserInputError as exc:
                print(f"adaptflow: error: {exc}", file=sys.stderr)
                outcome.result, outcome.code = {"command": command, "status": "error", "error": str(exc)}, 2
            except KeyboardInterrupt as exc:
                signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
                name = signal.Signals(signum).name
                print(f"adaptflow: interrupted ({name}){resume_hint}", file=sys.stderr)
                outcome.result = {"command": command, "status": "interrupted", "signal": name}
                outcome.code = 128 + signum
            except RunFailed as exc:  # a failure we can explain: the message says it all
                print(f"adaptflow: failed: {exc}", file=sys.stderr)
                outcome.result = {
                    "command": command,
                    "status": "failed",
                    "error": str(exc),
                    **getattr(exc, "result", {}),
                }
                outcome.code = 1
            except Exception as exc:
                if (reason := disk_error(exc)) is not None:  # a full disk is named, not a traceback
                    message = full_disk_message(exc, reason)
                else:
                    traceback.print_exc(file=sys.stderr)
                    message = f"{exc.__class__.__name__}: {exc}"
                print(f"adaptflow: failed: {message}", file=sys.stderr)
                outcome.result, outcome.code = {"command": command, "status": "failed", "error": message}, 1
        if json_output:
            stdout.write(json.dumps(outcome.result, default=str) + "\n")
            stdout.flush()


def full_disk_message(exc: Exception, reason: str) -> str:
    """A full disk that a command's own writes met (a run names its places itself, `flows.pipeline`): the file,
    else the MLflow store's database when SQLite says it is full, with the free space there."""
    from tasks.errors import SQLITE_FULL, free_mb

    path: str | None = exc.filename if isinstance(exc, OSError) and isinstance(exc.filename, str) else None
    if path is None and SQLITE_FULL in str(exc) and "mlflow" in sys.modules:
        from mlflow import get_tracking_uri

        from tasks.tracking import sqlite_store

        path = str(sqlite_store(get_tracking_uri()) or "") or None
    if path is None:
        return f"{reason} ({exc.__class__.__name__}: {str(exc)[:300]}); free some space and try again"
    free = free_mb(Path(path))
    room = f"{free:.1f} MB free" if free is not None else "free space unknown"
    return f"{reason} writing {path} ({room}); free some space on its disk and try again"


def connect(tracking: TrackingSettings | None, while_waiting: Sequence[Callable[[], object]] = ()) -> None:
    """Open the MLflow store of `tracking` (None: the command uses none) for this process; if the session
    started Prefect's temporary server, wait until it answers, opening the store and doing `while_waiting`
    (work the command does anyway) meanwhile."""
    if tracking is None:
        temporary_server.ready(while_waiting=while_waiting)
        return
    from tasks.tracking import use_tracking

    temporary_server.ready(while_waiting=[lambda: use_tracking(tracking), *while_waiting])
    use_tracking(tracking)  # again where the server was already up (or none was started): cheap, and errors surface


def _handle_signals(stack: contextlib.ExitStack) -> None:
    """SIGTERM stops a command the way Ctrl-C does (a run is marked KILLED, exit 143) instead of ending the
    process unmarked; the previous handlers come back when the session ends."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        stack.callback(signal.signal, signum, signal.signal(signum, Interrupted.raise_on))


class QuietCompletions(logging.Filter):
    """Prefect's "Finished in state Completed()" per task says nothing a user can act on; each stage says what it
    did on its own line instead (`flows.stages.say_what_it_did`). Other states (failed, crashed, cached) stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not text.startswith(
            ("Finished in state Completed", "Finished in state Cached", "Running hook '")
        ) and not (text.startswith("Hook '") and text.endswith("finished running successfully"))


# Warnings users cannot act on, by the module they are attributed to: a transformers deprecation that peft
# triggers. Also through PYTHONWARNINGS, for the processes a run starts (grid workers, torchrun ranks).
HARMLESS_WARNINGS = (("FutureWarning", "transformers.modeling_utils"),)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("adaptflow").setLevel(logging.INFO)
    for name in PREFECT_RUN_LOGGERS:  # logging.config (Prefect's setup) keeps a logger's filters
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietExplainedErrors) for f in logger.filters):  # once per process
            logger.addFilter(QuietExplainedErrors(logger))
            logger.addFilter(QuietCompletions())
    store_logger = logging.getLogger(MLFLOW_STORE_LOGGER)
    if not any(isinstance(f, QuietFullStore) for f in store_logger.filters):
        store_logger.addFilter(QuietFullStore())
    for category, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", category=getattr(builtins, category), module=module)
    inherited = [f"ignore::{category}:{module}" for category, module in HARMLESS_WARNINGS]
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS", ""), *inherited]))
    # MLflow's artifact download bars: one per registration and re-evaluation, noise in a run's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
