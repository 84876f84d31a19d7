"""Crash safety, as a new user would meet each fault: killed runs resume, NaN stops cleanly, an unreachable
tracking server is named, a crash before registration leaves nothing, and no input ends in a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import SAMPLES, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.stages import is_transient
from tasks.config import RunConfig, validate_config
from tasks.errors import UserInputError
from tasks.load import load_data
from tasks.objectives import OBJECTIVES
from tasks.settings import DataSettings
from tasks.tracking import RunRef, public_params, start_run
from tasks.training import MlflowStreamCallback, TrainingDiverged


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def run_config(tmp_path: Path, model: str, data: Path, **train: object) -> Path:
    return write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": model},
        data={"train": str(data), "max_length": 48, "eval_fraction": 0.2},
        method={"name": "lora", "r": 4, "dropout": 0.1, "target_modules": "all-linear"},
        train={"batch_size": 8, "learning_rate": 3e-3, "logging_steps": 5, **train},
        registry={"name": "safe"},
        bias_probe={"suite": None},
    )


def kill_after_checkpoint(config: Path, tmp_path: Path, steps: tuple[int, ...], skip: str) -> str:
    """Run `config` in a separate process and SIGKILL it (its whole process group) once it has written a
    checkpoint at one of `steps`; returns the killed run's id (the run folder other than `skip`)."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    # --force: the config was trained on this data already (that version would be reported, nothing trained).
    command = [str(Path(sys.executable).with_name("adaptflow")), "run", str(config), "--force"]
    child = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if any(any(runs.glob(f"*/checkpoints/checkpoint-{step}/trainer_state.json")) for step in steps):
                break
            time.sleep(0.05)
    finally:
        # The whole process group: a SIGKILLed run cannot stop its Prefect temporary server (a child process).
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    killed = [p.parents[1].name for p in runs.glob("*/checkpoints/checkpoint-*") if p.parents[1].name != skip]
    assert killed, "the child never checkpointed"
    return killed[0]


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = run_config(tmp_path, tiny_model, stories_file, max_steps=150, save_steps=10)
    assert main(["run", str(config), "--json"]) == 0
    uninterrupted = last_json(capsys.readouterr().out)

    # The same config in a separate process, SIGKILLed once it has checkpointed a few times.
    killed = [kill_after_checkpoint(config, tmp_path, (30, 40, 50), uninterrupted["run_id"])]
    assert MlflowClient().get_run(killed[0]).info.status == "RUNNING"  # SIGKILL: nobody could mark it

    # The data file replaced at the same path: continuing would train one run on two datasets.
    original = stories_file.read_text()
    lines = original.splitlines(keepends=True)
    stories_file.write_text("".join(lines[: len(lines) // 2]))
    assert main(["run", str(config), "--resume", "--json"]) == 2
    refused = capsys.readouterr().err
    assert "started on other content: data.train/data.eval" in refused and "--allow-changed" in refused
    # Its process was gone: the refused resume's start marked it FAILED, and the refusal left it as found then.
    assert MlflowClient().get_run(killed[0]).info.status == "FAILED"
    stories_file.write_text(original)

    assert main(["run", str(config), "--resume", "--json"]) == 0
    resumed = last_json(capsys.readouterr().out)
    assert resumed["run_id"] == killed[0], "continues the same MLflow run"
    assert 30 <= resumed["resumed_from_step"] < 150
    assert resumed["metrics"]["eval_loss"] == pytest.approx(uninterrupted["metrics"]["eval_loss"], rel=0.01)
    run = MlflowClient().get_run(killed[0])
    assert run.info.status == "FINISHED" and run.data.tags["adaptflow.resumed"] == "true"

    # Nothing left to resume: --resume says so (exit 2) instead of silently training a new run.
    assert main(["run", str(config), "--resume", "--json"]) == 2
    assert "--resume: no unfinished run of this config" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_dpo_run_of_method_full_resumes_to_where_the_uninterrupted_run_ends(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """DPO with `full`: the reference is a frozen copy of the model training started from. A resumed run must take
    it from the run's starting model again, not from the checkpoint it continues (whose rewards would then start
    at zero): the resumed run ends with the uninterrupted run's rewards and log-probs."""
    from test_preference import PAIRS, write_rows

    data = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    config = write_config(
        tmp_path / "dpo.yaml",
        model={"name_or_path": tiny_model},
        task="preference",
        data={"train": str(data), "max_length": 48, "eval_fraction": 0.25},
        preference={"loss": "sigmoid", "beta": 0.5, "max_new_tokens": 4},
        method={"name": "full"},
        train={"max_steps": 40, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 5, "logging_steps": 5},
        registry={"name": "dpo-safe", "promote": {"metric": "eval_reward_accuracy", "mode": "max"}},
        bias_probe={"suite": None},
    )
    assert main(["run", str(config), "--json"]) == 0
    uninterrupted = last_json(capsys.readouterr().out)
    killed = kill_after_checkpoint(config, tmp_path, (10, 15, 20), uninterrupted["run_id"])
    assert MlflowClient().get_run(killed).info.status == "RUNNING"  # SIGKILL: nobody could mark it

    assert main(["run", str(config), "--resume", "--json"]) == 0
    resumed = last_json(capsys.readouterr().out)
    assert resumed["run_id"] == killed and 10 <= resumed["resumed_from_step"] < 40
    before, after = uninterrupted["metrics"], resumed["metrics"]
    # Training moved the policy away from its reference: the rewards are far from zero, and so a reference
    # taken from the checkpoint would show.
    assert abs(before["eval_reward_margin"]) > 0.05
    for key in ("eval_loss", "eval_reward_margin", "eval_logps_chosen", "eval_logps_rejected"):
        assert after[key] == pytest.approx(before[key], rel=0.01), key
    assert after["eval_reward_accuracy"] == before["eval_reward_accuracy"]
    assert MlflowClient().get_run(killed).info.status == "FINISHED"


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_marks_the_run_failed_and_registers_nothing(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = run_config(tmp_path, tiny_model, stories_file, max_steps=20, save_steps=100, learning_rate=1e30)
    assert main(["run", str(config), "--json"]) == 1
    captured = capsys.readouterr()
    assert "training diverged: the loss became NaN or infinite at step" in captured.err
    assert "lower train.learning_rate" in captured.err and "Traceback" not in captured.err
    assert last_json(captured.out)["status"] == "failed"
    client = MlflowClient()
    assert client.search_registered_models() == []
    (run,) = client.search_runs([client.get_experiment_by_name("adaptflow").experiment_id])
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["adaptflow.error"]


def test_an_unreachable_tracking_server_is_named_at_once(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = run_config(tmp_path, tiny_model, stories_file, max_steps=2)
    started = time.monotonic()
    code = main(["run", str(config), "--set", "tracking.uri=http://user:hunter2@127.0.0.1:9", "--json"])
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 60
    assert "the MLflow tracking server at http://***@127.0.0.1:9 is unreachable" in err
    assert "hunter2" not in err and "Traceback" not in err


def test_metrics_are_buffered_while_the_tracking_server_is_away(monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    experiment = client.create_experiment("buffer")
    run_id = client.create_run(experiment).info.run_id
    ref = RunRef(run_id=run_id, experiment_id=experiment, tracking_uri=mlflow.get_tracking_uri(), run_dir=".")
    callback = MlflowStreamCallback(ref)
    real = MlflowClient.log_batch
    outage = {"left": 2}

    def flaky(self, *args, **kwargs):  # fault injection: the server is away for two calls
        if outage["left"]:
            outage["left"] -= 1
            raise ConnectionError("server away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    state = type("State", (), {"global_step": 0})()
    for step in range(1, 4):
        state.global_step = step
        callback.on_log(None, state, None, logs={"loss": 1.0 / step})
    assert callback.failures == 2 and not callback.pending
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3]


def test_a_crash_before_the_version_is_created_leaves_no_version(
    tmp_path: Path, tiny_model: str, stories_file: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    config = run_config(tmp_path, tiny_model, stories_file, max_steps=2, save_steps=100)

    def crash(*args, **kwargs):  # fault injection: the process dies between artifacts and registration
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow, "register_model", crash)
    assert main(["run", str(config), "--json"]) == 130
    client = MlflowClient()
    assert client.search_model_versions("name='safe'") == []
    (run,) = client.search_runs([client.get_experiment_by_name("adaptflow").experiment_id])
    assert run.info.status == "KILLED"
    assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}  # logged, never registered


def test_only_transient_failures_are_retried() -> None:
    class State:
        def __init__(self, error: BaseException) -> None:
            self.error = error

        def result(self):
            raise self.error

    transient = [ConnectionError("refused"), TimeoutError(), OSError("disk hiccup")]
    permanent = [UserInputError("data.train: file not found"), TrainingDiverged("nan"), MemoryError(), ValueError()]
    assert all(is_transient(None, None, State(e)) for e in transient)  # type: ignore[arg-type]
    assert not any(is_transient(None, None, State(e)) for e in permanent)  # type: ignore[arg-type]


def test_credentials_never_reach_params_or_tags(tmp_path: Path) -> None:
    config = RunConfig.model_validate(
        {"data": {"train": "x.jsonl"}, "model": {"name_or_path": "https://me:s3cret@hub.example/org/model"}}
    )
    assert all("s3cret" not in value for value in public_params(config).values())
    run = start_run(config.model_copy(update={"train": config.train.model_copy(update={"output_dir": str(tmp_path)})}))
    stored = MlflowClient().get_run(run.run_id)
    assert "s3cret" not in json.dumps(stored.data.params) + json.dumps(stored.data.tags)


# ---------------------------------------------------------------- property-based: no input ends in a traceback

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=8,
)
section_keys = st.sampled_from(
    ["model", "task", "data", "method", "train", "tracking", "registry", "grid", "bias_probe", "x"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        section_keys, yaml_values | st.dictionaries(st.text(max_size=15), yaml_values, max_size=4), max_size=5
    )
)
def test_any_config_is_valid_or_a_named_error(raw: dict) -> None:
    try:
        config = validate_config(raw)
    except UserInputError as exc:
        assert str(exc).strip() and all(p.strip() for p in exc.problems)
        return
    assert isinstance(config, RunConfig)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt"]),
)
def test_any_data_file_loads_or_is_a_named_error(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    try:
        ref = load_data(DataSettings(train=str(path)), OBJECTIVES["causal_lm"], tmp_path / "cache")
    except UserInputError as exc:
        assert "data.train" in str(exc) or "data.text_column" in str(exc) or "data.eval" in str(exc), str(exc)
        return
    assert ref.train_rows >= 1


def test_yaml_is_read_safely(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("data: !!python/object/apply:os.system ['echo pwned > " + str(tmp_path / "pwned") + "']\n")
    assert main(["run", str(evil), "--json"]) == 2
    assert not (tmp_path / "pwned").exists()
    assert yaml.safe_load("a: 1") == {"a": 1}


def _start_cli(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """`adaptflow ARGS` in its own process group (as a terminal runs a foreground job), output to a file."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    log = (tmp_path / "cli.log").open("w")
    command = [str(Path(sys.executable).with_name("adaptflow")), *args]
    return subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def _wait_for(condition, child: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None and time.monotonic() < deadline, "the moment to interrupt never came"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "to_group", "code"), [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)])
def test_ctrl_c_and_sigterm_exit_promptly_with_the_run_killed_and_a_resume_hint(
    tmp_path: Path, tiny_model: str, stories_file: Path, signum: int, to_group: bool, code: int
) -> None:
    config = run_config(tmp_path, tiny_model, stories_file, max_steps=500, save_steps=2)
    child = _start_cli(tmp_path, "run", str(config))
    try:
        _wait_for(lambda: any((tmp_path / "runs").glob("*/checkpoints/checkpoint-*")), child)
        # Ctrl-C in a terminal signals the whole foreground group (the temporary server too, before the fix).
        os.killpg(child.pid, signum) if to_group else child.send_signal(signum)
        sent = time.monotonic()
        child.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left of the group when it exited by itself
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    output = (tmp_path / "cli.log").read_text()
    assert child.returncode == code, output[-3000:]
    assert took < 30, f"{took:.0f} s from the signal to the exit"
    assert f"adaptflow: interrupted ({signal.Signals(signum).name})" in output and "--resume" in output
    assert "Connection refused" not in output and "Traceback" not in output.split("adaptflow: interrupted")[-1]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("adaptflow").experiment_id])
    assert run.info.status == "KILLED"


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="finds the server through /proc")
def test_a_run_that_loses_its_orchestrator_after_training_reports_what_it_registered(
    tmp_path: Path, tiny_model: str, stories_file: Path
) -> None:
    config = run_config(tmp_path, tiny_model, stories_file, max_steps=6, save_steps=2)
    child = _start_cli(tmp_path, "run", str(config), "--json")
    try:
        _wait_for(lambda: any((tmp_path / "runs").glob("*/checkpoints/checkpoint-*")), child)
        (server,) = _children(child.pid)  # the temporary Prefect server: the CLI's only child process
        os.kill(server, signal.SIGKILL)
        child.wait(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    output = (tmp_path / "cli.log").read_text()
    assert child.returncode == 0, output[-3000:]
    # Prefect's log worker still complains on stderr after the JSON line (stdout and stderr share the file here).
    result = json.loads([line for line in output.splitlines() if line.startswith('{"command"')][-1])
    assert result["status"] == "ok" and result["model_version"] == "1"
    assert any("orchestration was lost" in w for w in result["warnings"])
    client = MlflowClient()
    (version,) = client.search_model_versions("name='safe'")
    assert version.status == "READY" and str(client.get_model_version_by_alias("safe", "champion").version) == "1"
    assert client.get_run(result["run_id"]).info.status == "FINISHED"


def test_ctrl_c_during_an_import_interrupts_after_it_instead_of_aborting_in_the_extension(tmp_path: Path) -> None:
    """Seen for real: SIGINT while `import torch` ran its pybind11 initialization aborted the process (SIGABRT,
    a C++ stack dump). The interruption waits until the import is done, then ends the command as Ctrl-C does."""
    (tmp_path / "slow_import.py").write_text(
        "import os, signal, sys, time\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.5)  # still importing when the signal arrives\n"
        "print('imported', file=sys.stderr)\n"
    )
    script = (
        "import sys, time\n"
        "from flows.startup import session\n"
        "with session('probe', runs_flows=False, json_output=False) as outcome:\n"
        "    import slow_import\n"
        "    time.sleep(5)\n"
        "sys.exit(outcome.code)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 130, done.stderr
    assert "imported" in done.stderr and "adaptflow: interrupted (SIGINT)" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow
def test_exit_2_errors_met_after_the_flow_started_print_no_traceback(
    tmp_path: Path, tiny_model: str, stories_file: Path
) -> None:
    """Issue 30 item 12: a leaked `asyncio.CancelledError` traceback was seen after some exit-2 errors. Each path
    that fails after Prefect's temporary server and a flow started, as real processes side by side (the load
    that makes Prefect's exit-time flushes slow): the message alone, no traceback."""
    rows = [json.loads(line) for line in (SAMPLES / "sample_preferences.jsonl").read_text().splitlines()[:20]]
    (tmp_path / "norej.jsonl").write_text(
        "".join(json.dumps({k: r[k] for k in ("prompt", "chosen")}) + "\n" for r in rows)
    )
    lines = stories_file.read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text("\n".join([*lines[:30], '{"text": ', *lines[30:]]) + "\n")
    config = run_config(tmp_path, tiny_model, stories_file, max_steps=2)
    cases = {
        "nothing to resume": ["run", str(config), "--resume"],
        "no rejected column": ["run", str(config), "--set", "task=preference", "--set", "data.train=norej.jsonl"],
        "bad JSON line in a grid": ["grid", str(config), "--set", "data.train=bad.jsonl", "--json"],
    }
    adaptflow = str(Path(sys.executable).with_name("adaptflow"))
    children = {
        name: subprocess.Popen(
            [adaptflow, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in cases.items()
    }
    for name, child in children.items():
        _, err = child.communicate(timeout=600)
        assert child.returncode == 2, (name, err)
        assert "adaptflow: error:" in err, (name, err)
        assert "Traceback" not in err and "CancelledError" not in err, (name, err)
