"""Evaluation while training (issue 28): the metric history, early stopping and the best checkpoint, surviving a
kill -9 and resume, and a pruned grid reading the trials' logged evaluations."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config
from mlflow.tracking import MlflowClient
from transformers import EarlyStoppingCallback, TrainerControl, TrainerState, TrainingArguments

from flows.cli import main
from tasks.periodic_eval import ResumableEarlyStopping, logged_metrics, stopped_early

SAMPLES = Path(__file__).resolve().parent.parent / "tasks" / "builtin" / "sample_stories.jsonl"


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def word_salad(path: Path, rows: int = 40) -> Path:
    """Rows of random words from the tiny model's stories: held-out rows share only the word frequencies, so a
    model that memorises the training rows gets worse on them (it overfits within a few dozen steps)."""
    words = sorted({w for line in SAMPLES.read_text().splitlines() for w in json.loads(line)["text"].split()})
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=20))}) + "\n" for _ in range(rows)))
    return path


def overfit_config(tmp_path: Path, tiny_model: str, **train: object) -> Path:
    """A few dozen rows, a high learning rate, 400 steps, an evaluation every 10."""
    return write_config(
        tmp_path / "overfit.yaml",
        model={"name_or_path": tiny_model},
        data={"train": str(word_salad(tmp_path / "salad.jsonl")), "max_length": 48, "eval_fraction": 0.3},
        method={"name": "full"},
        train={
            "max_steps": 400,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "logging_steps": 10,
            "save_steps": 10,
            "eval_steps": 10,
            "best": {"metric": "eval_loss", "mode": "min"},
            "early_stopping": {"patience": 3},
            **train,
        },
        registry={"name": "overfit"},
        bias_probe={"suite": None},
    )


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.eval_steps=500"], "train.eval_steps: 500 is larger than train.max_steps (400)"),
        (
            ["train.early_stopping={patience: 0}"],
            "train.early_stopping.patience: Input should be greater than or equal to 1",
        ),
        (
            ["train.best={metric: eval_accuracy}"],
            "train.best.metric: 'eval_accuracy' is not a metric this run reports; task causal_lm reports eval_loss, eval_perplexity",
        ),
        (["train.eval_steps=null"], "train.best: needs train.eval_steps"),
        (["train.eval_steps=null", "train.best=null"], "train.early_stopping: needs train.eval_steps"),
    ],
)
def test_bad_evaluation_settings_exit_2_naming_the_key_before_anything_loads(
    tmp_path: Path, sets: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A model path that does not exist: the config is refused before the model (or anything) is looked at.
    config = overfit_config(tmp_path, str(tmp_path / "no-such-model"))
    assert main(["run", str(config), *(a for s in sets for a in ("--set", s)), "--json"]) == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-model" not in err
    assert not (tmp_path / "runs").exists()


def test_instruction_best_metric_names_the_generations_it_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "sft.yaml",
        task="instruction",
        data={"train": "x.jsonl"},
        train={"eval_steps": 10, "eval_generations": 0, "best": {"metric": "eval_rouge_l", "mode": "max"}},
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.best.metric: 'eval_rouge_l'" in err and "train.eval_generations above 0" in err


def test_the_stock_early_stopping_loses_its_patience_on_resume_and_ours_keeps_it(tmp_path: Path) -> None:
    """What transformers does: the counter is written into the checkpoint's trainer state, but a resumed Trainer
    (restore_callback_states_from_checkpoint off, its default: on, it would also restore a grid rung's stop flag)
    starts it at 0 again. Ours reads it back, and records the step it stopped at."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        eval_strategy="steps",
        eval_steps=1,
        metric_for_best_model="eval_loss",
        report_to="none",
    )
    assert args.restore_callback_states_from_checkpoint is False
    ours, stock = ResumableEarlyStopping(3, 0.0), EarlyStoppingCallback(3, 0.0)
    state, control = TrainerState(stateful_callbacks=[ours, stock]), TrainerControl()
    state.best_metric = 1.0
    for step, loss in ((1, 1.5), (2, 1.2)):  # two evaluations without improvement
        state.global_step = step
        for callback in (ours, stock):
            callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
    state.stateful_callbacks = {type(c).__name__: c.state() for c in (ours, stock)}  # as _save_checkpoint does
    path = tmp_path / "trainer_state.json"
    state.save_to_json(str(path))

    resumed = TrainerState.load_from_json(str(path))
    ours_again, stock_again = ResumableEarlyStopping(3, 0.0), EarlyStoppingCallback(3, 0.0)
    ours_again.on_train_begin(args, resumed, TrainerControl())
    stock_again.on_train_begin(args, resumed, TrainerControl())
    assert (ours_again.early_stopping_patience_counter, stock_again.early_stopping_patience_counter) == (2, 0)
    assert not stopped_early(resumed)

    control = TrainerControl()
    resumed.global_step = 3
    ours_again.on_evaluate(args, resumed, control, metrics={"eval_loss": 1.1})  # the third: stop, with a checkpoint
    assert control.should_training_stop and control.should_save and ours_again.stopped_at == 3
    resumed.stateful_callbacks = {ResumableEarlyStopping.__name__: ours_again.state()}
    assert stopped_early(resumed)


def test_a_rung_reads_the_best_evaluation_or_the_one_at_its_step() -> None:
    history = [(10, {"eval_loss": 2.0, "eval_runtime": 0.1}), (20, {"eval_loss": 1.5, "eval_runtime": 0.1})]
    assert logged_metrics(history, {"best_step": 10}, 25) == {"eval_loss": 2.0}
    assert logged_metrics(history, {}, 20) == {"eval_loss": 1.5}
    assert logged_metrics(history, {}, 25) is None  # the steps do not line up: the rung evaluates


def _child(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    command = [str(Path(sys.executable).with_name("adaptflow")), *args]
    return subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


@pytest.mark.slow
def test_an_overfitting_run_stops_early_registers_its_best_step_and_resumes_identically_after_kill_9(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = overfit_config(tmp_path, tiny_model)
    assert main(["run", str(config), "--json"]) == 0
    whole = last_json(capsys.readouterr().out)
    metrics = whole["metrics"]
    client = MlflowClient()

    # The history is in MLflow, one evaluation every 10 steps up to where training stopped.
    periodic: dict[int, float] = {}
    for m in sorted(client.get_metric_history(whole["run_id"], "eval_loss"), key=lambda m: (m.step, m.timestamp)):
        periodic.setdefault(m.step, m.value)  # the first value at a step (the final evaluation comes after)
    steps = int(metrics["steps"])
    assert metrics["stopped_early"] == 1 and steps < 400
    assert sorted(periodic) == list(range(10, steps + 1, 10))
    best_step = min(periodic, key=lambda s: periodic[s])
    assert metrics["best_step"] == best_step < steps
    assert steps - best_step == 3 * 10  # patience 3: three evaluations without improvement
    # The registered eval metric is the history's best, at best_step (the best checkpoint was evaluated).
    version = client.get_model_version("overfit", whole["model_version"])
    registered = client.get_run(version.run_id).data.metrics
    assert registered["eval_loss"] == pytest.approx(periodic[best_step], rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(periodic[best_step], rel=1e-6)
    assert metrics["eval_seconds"] >= metrics["periodic_eval_seconds"] > 0
    artifacts = {a.path for a in client.list_artifacts(whole["run_id"], "reports")}
    assert {"reports/metric_curves.png", "reports/eval_history.json"} <= artifacts
    # Retention (keep_checkpoints 1): the newest checkpoint and the best one.
    kept = sorted(p.name for p in (Path(whole["run_dir"]) / "checkpoints").iterdir())
    assert kept == sorted({f"checkpoint-{best_step}", f"checkpoint-{steps}"})

    # The same config in a separate process, SIGKILLed mid-training, then --resume.
    child = _child(tmp_path, "run", str(config), "--force")
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if any(runs.glob("*/checkpoints/checkpoint-30/trainer_state.json")):
                break
            time.sleep(0.02)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the whole group: its Prefect server too
        child.wait()
    killed = [p.name for p in runs.iterdir() if p.is_dir() and p.name != whole["run_id"] and p.name != ".cache"]
    assert killed, "the child never started a run"
    assert main(["run", str(config), "--resume", "--json"]) == 0
    resumed = last_json(capsys.readouterr().out)
    assert resumed["run_id"] == killed[0]
    assert resumed["resumed_from_step"] is not None and resumed["resumed_from_step"] < steps, "killed mid-training"
    again = resumed["metrics"]
    assert (again["best_step"], again["steps"], again["stopped_early"]) == (best_step, steps, 1)
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
    version = client.get_model_version("overfit", resumed["model_version"])
    assert client.get_run(version.run_id).data.metrics["eval_loss"] == pytest.approx(registered["eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_a_pruned_grid_with_periodic_evaluation_picks_the_same_winner_and_trains_no_more_steps(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "grid.yaml",
        model={"name_or_path": tiny_model},
        data={"train": str(stories_file), "max_length": 32, "eval_fraction": 0.2},
        method={"name": "lora"},
        train={"max_steps": 12, "batch_size": 8, "learning_rate": 3e-3, "logging_steps": 2},
        registry={"name": "grid"},
        bias_probe={"suite": None},
        grid={
            "r": [1, 2, 4, 8],
            "alpha": [8],
            "target_modules": [["q_proj", "v_proj"]],
            "max_parallel": 2,
            "prune": {"eta": 2, "min_steps": 3},
        },
    )
    assert main(["grid", str(config), "--json"]) == 0
    plain = last_json(capsys.readouterr().out)
    assert main(["grid", str(config), "--set", "train.eval_steps=3", "--json"]) == 0
    periodic = last_json(capsys.readouterr().out)

    assert periodic["best"]["index"] == plain["best"]["index"]
    assert periodic["steps_total"] <= plain["steps_total"]
    # The rungs ranked on the same values: read from the trials' evaluations at steps 3 and 6, not evaluated again.
    for a, b in zip(plain["trials"], periodic["trials"], strict=True):
        assert [r["steps"] for r in a["rungs"]] == [r["steps"] for r in b["rungs"]]
        assert [r["value"] for r in a["rungs"]] == pytest.approx([r["value"] for r in b["rungs"]], rel=1e-5)
    client = MlflowClient()
    for trial in periodic["trials"]:
        history = client.get_metric_history(trial["run_id"], "eval_loss")
        assert {m.step for m in history} >= set(range(3, trial["steps"] + 1, 3))
    artifacts = {a.path for a in client.list_artifacts(periodic["parent_run_id"], "reports")}
    assert "reports/grid_eval_curves.png" in artifacts
