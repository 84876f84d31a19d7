"""Resume and disk faults (issue 20): damaged checkpoints, a checkpoint already at max_steps, stale error tags,
and a read-only or full `train.output_dir` (real mounts; skipped where mounting is not allowed)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import write_config
from mlflow.tracking import MlflowClient

from adapters_impl.lora import LoraSettings
from flows.cli import main
from flows.stages import is_transient
from tasks.adapting import apply_method
from tasks.config import RunConfig, TrainSettings
from tasks.errors import RunFailed
from tasks.load import load_data
from tasks.modeling import resolve_model
from tasks.objectives import OBJECTIVES
from tasks.settings import DataSettings, ModelSettings
from tasks.tokenization import tokenize_dataset
from tasks.tracking import OWNER_TAG, RunRef, end_run, process_identity, start_run
from tasks.training import TrainedRef, train_model


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


class Trainer:
    """The train stage called directly (no Prefect) on one run folder, as a first run and as a resume."""

    def __init__(
        self,
        tmp_path: Path,
        tiny_model: str,
        stories_file: Path,
        max_steps: int,
        save_steps: int,
        run_dir: Path | None = None,
    ) -> None:
        source = resolve_model(ModelSettings(name_or_path=tiny_model))
        data = load_data(
            DataSettings(train=str(stories_file), max_length=48), OBJECTIVES["causal_lm"], tmp_path / "cache" / "d"
        )
        self.tokenized = tokenize_dataset(data, source, "causal_lm", 48, tmp_path / "cache" / "t")
        self.run_dir = run_dir or tmp_path / "run"
        self.adapted = apply_method(
            source, LoraSettings(r=4, target_modules="all-linear"), "causal_lm", self.tokenized, str(self.run_dir), 0
        )
        client = MlflowClient()
        experiment = client.create_experiment("resume")
        run_id = client.create_run(experiment).info.run_id
        self.run = RunRef(
            run_id=run_id, experiment_id=experiment, tracking_uri=mlflow.get_tracking_uri(), run_dir=str(self.run_dir)
        )
        self.settings = TrainSettings(
            max_steps=max_steps, save_steps=save_steps, batch_size=8, learning_rate=3e-3, logging_steps=1
        )

    def train(self) -> TrainedRef:
        return train_model(self.adapted, self.tokenized, self.settings, self.run)

    def checkpoints(self) -> list[str]:
        return sorted(
            (p.name for p in (self.run_dir / "checkpoints").glob("checkpoint-*")),
            key=lambda name: int(name.split("-")[1]),
        )


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(
    tmp_path: Path, tiny_model: str, stories_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = Trainer(tmp_path, tiny_model, stories_file, max_steps=6, save_steps=4)
    first = trainer.train()
    assert trainer.checkpoints() == ["checkpoint-4", "checkpoint-6"]
    weights = trainer.run_dir / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk or a crash mid-write

    with caplog.at_level(logging.WARNING, logger="adaptflow"):
        resumed = trainer.train()
    assert resumed.resumed_from_step == 4 and resumed.steps == 6
    assert "checkpoint-6" in caplog.text and "adapter_model.safetensors" in caplog.text
    assert resumed.train_loss == pytest.approx(first.train_loss, rel=0.2)

    # Every checkpoint damaged: a message naming the files, not a raw SafetensorError.
    for name in trainer.checkpoints():
        state = trainer.run_dir / "checkpoints" / name / "trainer_state.json"
        state.write_text("{not json")
    with pytest.raises(RunFailed) as failure:
        trainer.train()
    message = str(failure.value)
    assert "no checkpoint" in message and "trainer_state.json" in message and "checkpoint-4" in message


def test_a_checkpoint_at_max_steps_resumes_straight_to_evaluation(
    tmp_path: Path, tiny_model: str, stories_file: Path
) -> None:
    trainer = Trainer(tmp_path, tiny_model, stories_file, max_steps=4, save_steps=2)
    first = trainer.train()
    assert trainer.checkpoints() == ["checkpoint-2", "checkpoint-4"]
    resumed = trainer.train()  # killed after training (during evaluation, say): nothing left to train
    assert trainer.checkpoints() == ["checkpoint-2", "checkpoint-4"]
    assert resumed.steps == 4 and resumed.resumed_from_step == 4
    assert resumed.loss_history == first.loss_history
    assert resumed.train_loss == pytest.approx(first.train_loss)
    assert (trainer.run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_a_run_resumed_to_finished_keeps_no_error_tag(tmp_path: Path) -> None:
    config = RunConfig.model_validate({"data": {"train": "x.jsonl"}, "train": {"output_dir": str(tmp_path)}})
    run = start_run(config)
    end_run(run, "KILLED", "KeyboardInterrupt()")
    resumed = start_run(config, resume=True)
    assert resumed.run_id == run.run_id
    assert "adaptflow.error" not in MlflowClient().get_run(run.run_id).data.tags  # not stale while running
    end_run(resumed, "FINISHED")
    finished = MlflowClient().get_run(run.run_id)
    assert finished.info.status == "FINISHED" and "adaptflow.error" not in finished.data.tags


@contextmanager
def mounted(folder: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at `folder` (read-only or tiny), unmounted afterwards; skipped where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def disk_config(tmp_path: Path, model: str, data: Path, output_dir: Path) -> Path:
    return write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": model},
        data={"train": str(data), "max_length": 48},
        method={"name": "lora", "r": 4, "target_modules": "all-linear"},
        train={"batch_size": 8, "max_steps": 2, "save_steps": 100, "output_dir": str(output_dir)},
        registry={"name": "disk"},
        bias_probe={"suite": None},
    )


def all_runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_read_only_output_dir_is_named_before_anything_starts(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with mounted(tmp_path / "ro", "ro,size=1m") as folder:
        config = disk_config(tmp_path, tiny_model, stories_file, folder / "runs")
        assert main(["run", str(config), "--json"]) == 2
    captured = capsys.readouterr()
    assert "train.output_dir" in captured.err and str(folder / "runs") in captured.err
    assert "Read-only file system" in captured.err and "Traceback" not in captured.err
    assert last_json(captured.out)["status"] == "error"
    assert all_runs() == []


def test_a_full_output_dir_is_named_and_the_failed_stage_leaves_nothing(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with mounted(tmp_path / "full", "size=48k") as folder:
        config = disk_config(tmp_path, tiny_model, stories_file, folder / "runs")
        code = main(["run", str(config), "--json"])
        captured = capsys.readouterr()
        left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    assert code == 1
    message = captured.err.strip().splitlines()[-1]  # what the user reads last, instead of a bare errno
    assert message.startswith("adaptflow: failed: No space left on device") and str(folder / "runs") in message
    assert "--resume" in message
    (run,) = all_runs()
    assert run.info.status == "FAILED"
    # Tokenization ran out of space: no temporary or staging files of it are left in the cache.
    assert not [p for p in left if Path(p).name.startswith("tmp") or ".partial-" in p], left


def test_a_full_or_read_only_disk_is_never_retried() -> None:
    class State:
        def __init__(self, error: BaseException) -> None:
            self.error = error

        def result(self) -> None:
            raise self.error

    disk = [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs"),
        OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
        RuntimeError("I/O error: No space left on device (os error 28)"),  # how safetensors says it
    ]
    assert not any(is_transient(None, None, State(e)) for e in disk)  # type: ignore[arg-type]
    assert is_transient(None, None, State(OSError(errno.EIO, "disk hiccup")))  # type: ignore[arg-type]


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_named_and_removed(
    tmp_path: Path, tiny_model: str, stories_file: Path
) -> None:
    with mounted(tmp_path / "full", "size=4m") as folder:
        trainer = Trainer(tmp_path, tiny_model, stories_file, max_steps=2, save_steps=1, run_dir=folder / "run")
        weights = (trainer.run_dir / "adapter-init" / "adapter_model.safetensors").stat().st_size
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        (folder / "filler").write_bytes(b"\0" * (free - weights - 16384))  # the weights fit; the optimizer does not
        with pytest.raises(OSError) as failure:
            trainer.train()
        assert failure.value.errno == errno.ENOSPC and "checkpoint-1" in str(failure.value.filename)
        assert not list((trainer.run_dir / "checkpoints").glob("checkpoint-*"))


@pytest.mark.slow
def test_a_tracking_store_filling_up_mid_run_is_named_once_and_its_run_marked_at_the_next_start(
    tmp_path: Path, tiny_model: str, stories_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's disk fills once the run is open: SQLite's "database or disk is full" on every write, even
    the one marking the run FAILED. A real `adaptflow run` process on a real full tmpfs."""
    with mounted(tmp_path / "disk", "size=8m") as disk:
        store = f"sqlite:///{disk / 'mlflow.db'}"
        runs = tmp_path / "runs"
        config = disk_config(tmp_path, tiny_model, stories_file, runs)
        env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PREFECT_HOME": str(tmp_path / "prefect-child")}
        adaptflow = str(Path(sys.executable).with_name("adaptflow"))
        child = subprocess.Popen(
            [adaptflow, "run", str(config), "--set", "train.max_steps=200", "--set", "train.logging_steps=1"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while child.poll() is None and time.monotonic() < deadline and not any(runs.glob("[0-9a-f]*")):
            time.sleep(0.05)  # start_run made the run's folder: the run is open in the store
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * free)
        _, err = child.communicate(timeout=300)
        assert child.returncode == 1, err
        assert "Traceback" not in err and "database or disk is full" not in err, err
        assert err.count("adaptflow: failed:") == 1, err  # after the Trainer's progress bar, on its line
        message = err.split("adaptflow: failed:")[1]
        assert f"the MLflow store: {disk / 'mlflow.db'}, 0.0 MB free" in message
        assert "could not be marked FAILED" in message and "--resume" in message
        (run_dir,) = [p for p in runs.iterdir() if not p.name.startswith(".")]

        (disk / "filler").unlink()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
        client = MlflowClient(store, store)
        assert client.get_run(run_dir.name).info.status == "RUNNING"  # its process could not mark it
        start_run(RunConfig.model_validate(yaml.safe_load(config.read_text())))  # the next start marks it
        left = client.get_run(run_dir.name)
    assert left.info.status == "FAILED"
    assert "ended without marking it" in left.data.tags["adaptflow.error"]


def test_full_mlflow_artifacts_are_named_by_their_folder(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Registration writes the model into the store's artifacts (beside its database): that disk is named, not
    train.output_dir (whose disk has room)."""
    with mounted(tmp_path / "artifacts", "size=64k") as folder:
        config = disk_config(tmp_path, tiny_model, stories_file, tmp_path / "runs")
        code = main(["run", str(config)])
        captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err, captured.err
    message = captured.err.strip().splitlines()[-1]
    assert message.startswith("adaptflow: failed: No space left on device"), message
    assert f"the MLflow artifacts: {folder}" in message and "train.output_dir" not in message
    (run,) = [r for r in all_runs() if r.data.tags.get("adaptflow.method")]  # not the stored base's run
    assert run.info.status == "FAILED"


def test_the_next_start_marks_only_runs_whose_process_is_gone(tmp_path: Path) -> None:
    """A run left RUNNING by a dead process is marked FAILED, saying why; a live process's run, another host's,
    and a run no adaptflow process claimed are left as they are."""
    config = RunConfig.model_validate({"data": {"train": "x.jsonl"}, "train": {"output_dir": str(tmp_path)}})
    live = start_run(config)
    client = MlflowClient()
    dead = start_run(config)
    gone = subprocess.Popen(["sleep", "0.1"])
    client.set_tag(dead.run_id, OWNER_TAG, process_identity(gone.pid))
    gone.wait()
    elsewhere = start_run(config)
    client.set_tag(elsewhere.run_id, OWNER_TAG, f"another-host:{gone.pid}:1.00")
    unclaimed = client.create_run(live.experiment_id).info.run_id
    start_run(config)
    status = {run: client.get_run(run).info.status for run in (live.run_id, dead.run_id, elsewhere.run_id, unclaimed)}
    assert status == {live.run_id: "RUNNING", dead.run_id: "FAILED", elsewhere.run_id: "RUNNING", unclaimed: "RUNNING"}
    why = client.get_run(dead.run_id).data.tags["adaptflow.error"]
    assert f"pid {gone.pid}" in why and "ended without marking it" in why
