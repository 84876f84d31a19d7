"""Deployments, schedules and triggers parse; the watcher fingerprints by content; and the real thing: a Prefect
server, `adaptflow serve`, new data in a watched folder -> a retrain flow run -> a new registered version."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from adapters_impl import METHODS
from flows.serve import build_deployments, read_deployments
from flows.watch import check

BIN = Path(sys.executable).parent
SAMPLES = Path(__file__).resolve().parent.parent / "tasks" / "builtin"


def test_every_deployment_schedule_and_trigger_parses_and_parameters_fit_their_flow() -> None:
    specs = {d["name"]: d for d in read_deployments()}
    assert set(METHODS) | {"grid", "retrain", "instruct"} <= set(specs)
    deployments = {d.name: d for d in build_deployments()}
    retrain = deployments["retrain"]
    (schedule,) = retrain.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Lisbon")
    (trigger,) = retrain.triggers
    assert trigger.expect == {"adaptflow.dataset.updated"}
    assert trigger.parameters["data"] == "{{ event.payload.path }}"
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parent.parent
    for spec in specs.values():
        flow = load_flow_from_entrypoint(str(root / spec["entrypoint"]))
        flow.validate_parameters(spec.get("parameters") or {})  # raises if a deployment's parameters do not fit


def test_fingerprint_is_by_content_and_reports_what_changed(tmp_path: Path) -> None:
    folder, state = tmp_path / "data", tmp_path / "state.json"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "one"}\n')
    first = check(folder, 0.05, state)
    assert first and first["added"] == ["a.jsonl"]
    os.utime(folder / "a.jsonl", (time.time() + 100, time.time() + 100))  # touch: same content
    assert check(folder, 0.05, state) is None
    (folder / "b.jsonl").write_text('{"text": "two"}\n')
    (folder / "a.jsonl").write_text('{"text": "one, edited"}\n')
    change = check(folder, 0.05, state)
    assert change and (change["added"], change["changed"], change["removed"]) == (["b.jsonl"], ["a.jsonl"], [])
    (folder / "b.jsonl").unlink()
    assert check(folder, 0.05, state)["removed"] == ["b.jsonl"]


def test_a_file_still_being_written_fires_once(tmp_path: Path) -> None:
    folder, state = tmp_path / "data", tmp_path / "state.json"
    folder.mkdir()
    check(folder, 0.05, state)

    def write_slowly() -> None:
        with (folder / "big.jsonl").open("w") as handle:
            for i in range(8):
                handle.write(json.dumps({"text": f"line {i}"}) + "\n")
                handle.flush()
                time.sleep(0.15)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    time.sleep(0.05)
    change = check(folder, 0.4, state)  # waits for the writer to finish before fingerprinting
    writer.join()
    assert change and change["added"] == ["big.jsonl"]
    assert check(folder, 0.05, state) is None, "the finished file does not fire a second time"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_new_data_in_a_watched_folder_retrains_and_registers_a_new_version(tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    watched = tmp_path / "incoming"
    watched.mkdir()
    shutil.copy(SAMPLES / "sample_stories.jsonl", watched / "stories-1.jsonl")
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("server", "serve")}
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=logs["server"], stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    serve = None
    try:
        wait_for(lambda: healthy(f"{api}/health"), 180, "the Prefect server")
        serve = subprocess.Popen(
            [str(BIN / "adaptflow"), "serve"], env=env, stdout=logs["serve"], stderr=subprocess.STDOUT, cwd=tmp_path
        )
        client = MlflowClient()
        wait_for(lambda: "retrain" in (tmp_path / "serve.log").read_text(), 180, "adaptflow serve to start", 2)
        time.sleep(3)  # the trigger's automation is created with the deployment

        # The first look at the folder fires too: the watcher has never seen it.
        watch = subprocess.run(
            [str(BIN / "adaptflow"), "watch", str(watched), "--once", "--json"],
            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert watch.returncode == 0, watch.stderr[-2000:]
        (event,) = json.loads(watch.stdout.strip().splitlines()[-1])["events"]
        assert event["path"] == str(watched.resolve()) and event["added"] == ["stories-1.jsonl"]

        def registered() -> list:
            try:
                return client.search_model_versions("name='adaptflow-retrain'")
            except Exception:
                return []

        versions = wait_for(registered, 300, "a version registered by the triggered retrain run", 3)
        run = client.get_run(versions[0].run_id)
        assert run.data.params["data.train"] == str(watched.resolve())  # the event's folder reached the run
    finally:
        for process in (serve, server):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        for handle in logs.values():
            handle.close()


def test_watch_once_with_the_prefect_api_away_fails_and_keeps_the_change_pending(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "new"}\n')
    env = {
        **os.environ,
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",  # nothing listens there
        "ADAPTFLOW_CACHE": str(tmp_path / "cache"),
    }
    command = [str(BIN / "adaptflow"), "watch", str(folder), "--once", "--settle", "0.05", "--json"]
    away = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert away.returncode == 1, away.stdout[-2000:]
    assert "does not answer" in away.stderr and "not recorded" in away.stderr and "emitted" not in away.stderr
    assert not list((tmp_path / "cache" / "watch").glob("*.json")), "the fingerprint must not be saved"
