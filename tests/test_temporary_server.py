"""The CLI's early Prefect server: started before Prefect is imported, used by Prefect, gone with its parent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHILD = """
import os, sys, time
from flows import temporary_server
temporary_server.start_early()
temporary_server.ready()
from prefect.settings import PREFECT_API_URL  # Prefect imported only now: it must see the early server
print(temporary_server._server.process.pid, os.environ["PREFECT_API_URL"], PREFECT_API_URL.value(), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by init) counts as gone.
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") == -1


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux-only")
def test_the_early_server_serves_prefect_and_dies_with_a_sigkilled_cli(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    parent = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        server_pid, exported, seen_by_prefect = parent.stdout.readline().split()
        assert exported == seen_by_prefect and exported.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{exported}/health", timeout=10) as response:
            assert response.status == 200
        parent.send_signal(signal.SIGKILL)  # no exit handlers run: only the parent-death signal can stop it
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _alive(int(server_pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(int(server_pid)), "the temporary server outlived its SIGKILLed parent"
    finally:
        parent.kill()


RETRY_CHILD = """
import os, socket
from flows import temporary_server
taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()  # fault injection: the first port chosen is already in use
ports = iter([taken.getsockname()[1]])
free = temporary_server._free_port
temporary_server._free_port = lambda: next(ports, None) or free()
temporary_server.start_early()
import prefect  # as the CLI does: Prefect is imported before the server answers
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
temporary_server.ready()
with get_client(sync_client=True) as client:
    client.read_flows()  # the retried server answers, migrated
print(taken.getsockname()[1], PREFECT_API_URL.value(), flush=True)
"""


def test_a_server_retried_on_another_port_is_the_one_prefect_uses(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-c", RETRY_CHILD], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    taken, used = done.stdout.split()
    assert "retrying on another port" in done.stderr
    assert used.startswith("http://127.0.0.1:") and f":{taken}/" not in used


@pytest.mark.slow
def test_two_first_runs_on_a_new_prefect_home_both_get_a_migrated_server(tmp_path: Path) -> None:
    # Both CLIs start a temporary server on the same new database; before the migration lock, one failed
    # half-way through migrating it (exit 1, a long traceback). `promote` of an unknown name is the
    # shortest command that runs a flow: both must reach it and exit 2 with its message.
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    command = [str(Path(sys.executable).with_name("adaptflow")), "promote", "--name", "nothing"]
    children = [
        subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for _ in range(2)
    ]  # fmt: skip
    try:
        outputs = [child.communicate(timeout=400)[0] for child in children]
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
    for child, output in zip(children, outputs, strict=True):
        assert child.returncode == 2, output[-3000:]
        assert (
            "no registered model called 'nothing'" in output and "Traceback" not in output.split("adaptflow: error")[-1]
        )


OPEN_STORE = """
import sys
from tasks.config import TrackingSettings
from tasks.tracking import use_tracking
use_tracking(TrackingSettings(uri=sys.argv[1])).search_experiments()
"""


def test_four_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    # Without the lock beside the database, MLflow's migration of a new SQLite store fails in all but one of
    # them ("table _alembic_tmp_tags already exists"): seen as a flaky exit 1 of two first runs.
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    children = [
        subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for _ in range(4)
    ]  # fmt: skip
    for child in children:
        output = child.communicate(timeout=300)[0]
        assert child.returncode == 0, output[-3000:]
