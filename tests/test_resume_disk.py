"""Resume and disk faults (issue 20): damaged checkpoints, a checkpoint already at max_steps, stale error tags,
and a read-only or full `train.output_dir` (real mounts; skipped where mounting is not allowed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from adapters_impl.lora import LoraSettings
from tasks.adapting import apply_method
from tasks.config import DataSettings, ModelSettings, RunConfig, TrainSettings
from tasks.errors import RunFailed
from tasks.load import load_data
from tasks.modeling import resolve_model
from tasks.tokenization import tokenize_dataset
from tasks.tracking import RunRef, end_run, start_run
from tasks.training import TrainedRef, train_model


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


class Trainer:
    """The train stage called directly (no Prefect) on one run folder, as a first run and as a resume."""

    def __init__(self, tmp_path: Path, tiny_model: str, stories_file: Path, max_steps: int, save_steps: int) -> None:
        source = resolve_model(ModelSettings(name_or_path=tiny_model))
        data = load_data(DataSettings(train=str(stories_file), max_length=48), "causal_lm", tmp_path / "cache" / "d")
        self.tokenized = tokenize_dataset(data, source, "causal_lm", 48, tmp_path / "cache" / "t")
        self.run_dir = tmp_path / "run"
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
