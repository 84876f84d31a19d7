"""Prefect's temporary server, started the moment the CLI starts instead of when the first flow asks for it.

Prefect starts its temporary server (a `uvicorn` child running its API on SQLite) lazily, after the caller has
imported Prefect, and a start takes ~6 s on a warm database. Started here, before torch and friends are imported
(~10 s), it is ready by the time the first flow runs: the same command and environment Prefect uses, pointed to
through PREFECT_API_URL. This module imports nothing heavy on purpose.

Unlike Prefect's own, this child dies with the CLI even when the CLI is SIGKILLed (a parent-death signal), and
it runs in its own session: a Ctrl-C in the terminal (SIGINT to the foreground process group) reaches the CLI
only, which then still has a server to report the interrupted run to.

Two first runs on a new PREFECT_HOME would both migrate the same fresh database (one fails half-way): a file
lock beside the database serialises the first migration.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from filelock import FileLock, Timeout

from tasks.errors import RunFailed

log = logging.getLogger("adaptflow")

_PR_SET_PDEATHSIG = 1


class TemporaryServer:
    """One `uvicorn prefect.server.api.server:create_app` child on a free loopback port.

    Its URL is known at once; the process starts with `start()`, from the main thread (the parent-death signal
    fires when the thread that started the child ends).
    """

    def __init__(self) -> None:
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = _migration_lock()

    def start(self, wait_for_migration: bool) -> bool:
        """Start the child; False (nothing started) if another process is migrating a new database and
        `wait_for_migration` is False."""
        migrating = False
        if self._lock is not None:
            timeout = _startup_timeout() if wait_for_migration else 0
            try:
                self._lock.acquire(timeout=timeout)
            except Timeout:
                if not wait_for_migration:
                    return False
                raise RunFailed(
                    f"another adaptflow is still migrating Prefect's new database (lock {self._lock.lock_file}) "
                    f"after {timeout:.0f} s; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
                ) from None
            migrating = not _database().exists()  # a new database: hold the lock until it is migrated
            if not migrating:
                self._lock.release()
        self.process = subprocess.Popen(
            self._command(), env=self._environment(), preexec_fn=_die_with_parent, start_new_session=True
        )
        threading.Thread(target=self._warm_up, args=(migrating,), name="prefect-server-warm-up", daemon=True).start()
        return True

    def _command(self) -> list[str]:
        spec = importlib.util.find_spec("prefect")  # finds the package without importing it
        assert spec is not None and spec.submodule_search_locations, "prefect is not installed"
        app_dir = Path(next(iter(spec.submodule_search_locations))).parent
        return [
            sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir),
            "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip

    @staticmethod
    def _environment() -> dict[str, str]:
        # What Prefect's SubprocessASGIServer sets: no UI, ephemeral mode (only the services it needs).
        return {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}

    def _warm_up(self, migrating: bool) -> None:
        """The API's first real request takes the server ~0.6 s (health checks do not count): make it while
        the CLI is still importing. This thread only waits on sockets (and releases the migration lock: a
        server that answers has migrated its database)."""
        healthy = self.wait(timeout=300)
        if migrating and self._lock is not None:
            self._lock.release()
        if healthy:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.api_url}/admin/version", timeout=30):
                pass

    def healthy(self) -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
            return bool(response.status == 200)
        return False

    def wait(self, timeout: float) -> bool:
        """True once the API answers; False if the child died or the time ran out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if self.healthy():
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_server: TemporaryServer | None = None


def start_early() -> None:
    """Start the server now and point Prefect at it, unless a Prefect API is configured or Prefect is loaded.

    Prefect reads PREFECT_API_URL when it is imported: once it is (a caller that imported flows itself), it is
    left to start its own temporary server as usual.
    """
    global _server
    if _server is not None or os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return
    _server = TemporaryServer()
    os.environ["PREFECT_API_URL"] = _server.api_url
    _server.start(wait_for_migration=False)  # else it starts in ready(), once the other process has migrated
    atexit.register(stop)


def ready(while_waiting: Sequence[Callable[[], object]] = ()) -> None:
    """Wait until the early server answers (a fresh database is migrated first); one retry on a new port.

    `while_waiting`: work the run does anyway (imports, opening the store), done only while the server is still
    starting: free time on a fresh database or a busy machine, no cost otherwise. Its errors are left for the
    run itself to meet and report.
    """
    global _server
    if _server is None:
        return
    for work in while_waiting:
        if _server.process is not None and _server.healthy():
            break
        with contextlib.suppress(Exception):
            work()
    if _server.process is None:
        _server.start(wait_for_migration=True)
    timeout = _startup_timeout()
    if _server.wait(timeout):
        log.info(
            "Prefect: temporary server on %s (set PREFECT_API_URL to keep runs on a persistent one)", _server.api_url
        )
        return
    _server.stop()  # the port may have been taken between choosing and binding it: try another once
    log.warning("Prefect's temporary server did not start on port %s; retrying on another port", _server.port)
    _server = TemporaryServer()
    _use_api_url(_server.api_url)
    _server.start(wait_for_migration=True)
    if not _server.wait(timeout):
        code = _server.process.poll() if _server.process is not None else None
        _server.stop()
        state = f"exited with code {code}" if code is not None else f"did not answer within {timeout:.0f} s"
        raise RunFailed(
            f"Prefect's temporary server {state} (its log is above); raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a running server"
        )


def stop() -> None:
    """Stop the server, after sending it what Prefect still holds (exit handlers run newest first, so
    logging's own flush would otherwise come after the server is gone, and wait 5 s on it)."""
    if _server is None or _server.process is None or _server.process.poll() is not None:
        return
    if "prefect" in sys.modules:
        with contextlib.suppress(Exception):
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
            EventsWorker.drain_all(timeout=5)
    _server.stop()


def _use_api_url(url: str) -> None:
    """Point Prefect at `url`, also when it is already imported (it reads PREFECT_API_URL once, at import)."""
    os.environ["PREFECT_API_URL"] = url
    if "prefect" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()  # every thread's settings, from the environment again


def _startup_timeout() -> float:
    return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))


def _database() -> Path:
    """The temporary server's SQLite database (Prefect's default place)."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser() / "prefect.db"


def _migration_lock() -> FileLock | None:
    """A lock beside the database (none when Prefect is configured with another database)."""
    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or os.environ.get(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    ):
        return None
    database = _database()
    database.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(database.with_name("prefect.db.migrate.lock")), thread_local=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
