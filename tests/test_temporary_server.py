"""The CLI's early Prefect server: started before Prefect is imported, used by Prefect, gone with its parent."""

from __future__ import annotations

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
