"""`task: preference` as an objective: each loss and method through the real stages (tokenize -> apply -> train ->
evaluate) on the builtin tiny Llama, its config checks, and end to end through the CLI (run -> register -> predict
in fresh processes; bad input exits 2 with nothing registered)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import write_config
from mlflow.tracking import MlflowClient

from adapters_impl import METHODS
from tasks.adapting import apply_method
from tasks.config import TrainSettings, validate_config
from tasks.errors import UserInputError
from tasks.evaluation import evaluate_base, evaluate_model
from tasks.load import load_data
from tasks.modeling import ModelSource, resolve_model
from tasks.objectives import OBJECTIVES
from tasks.settings import DataSettings, ModelSettings
from tasks.tokenization import TokenizedRef, tokenize_dataset
from tasks.tracking import RunRef
from tasks.training import train_model

BIN = Path(sys.executable).parent
PETS = ("cat", "dog", "bird", "fish", "rabbit", "turtle")
PLACES = ("park", "garden", "house", "forest")
PAIRS = [
    {"prompt": f"Where does the {pet} play?", "chosen": f"In the {place}.", "rejected": f"The {pet} is {place}y."}
    for pet in PETS
    for place in PLACES
]
UNPAIRED = [
    {
        "messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[side]}],
        "label": side == "chosen",
    }
    for p in PAIRS
    for side in ("chosen", "rejected")
]
LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo", "kto")
# Methods whose trained model starts out equal to the base: the policy equals its reference at step 1.
STARTS_AS_BASE = ("lora", "dora", "ia3", "full", "qlora", "adapter")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def source(tiny_model: str) -> ModelSource:
    return resolve_model(ModelSettings(name_or_path=tiny_model))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("preference")


def tokenized_for(loss: str, source: ModelSource, folder: Path) -> TokenizedRef:
    rows, name = (UNPAIRED, "unpaired") if loss == "kto" else (PAIRS, "pairs")
    file = write_rows(folder / f"{name}.jsonl", rows)
    settings = DataSettings(train=str(file), eval_fraction=0.25, max_length=48)
    data = load_data(settings, OBJECTIVES["preference"], folder / "data")
    options = validate_config(
        {"task": "preference", "data": {"train": str(file)}, "preference": {"loss": loss}}
    ).task_options()
    return tokenize_dataset(data, source, "preference", 48, folder / "tok", options)


def a_run(tmp_path: Path) -> RunRef:
    client = MlflowClient()
    found = client.get_experiment_by_name("preference-stages")
    experiment = found.experiment_id if found else client.create_experiment("preference-stages")
    run_id = client.create_run(experiment).info.run_id
    return RunRef(
        run_id=run_id, experiment_id=experiment, tracking_uri=mlflow.get_tracking_uri(), run_dir=str(tmp_path)
    )


CASES = [(loss, "lora") for loss in LOSSES] + [("sigmoid", name) for name in METHODS if name not in ("lora", "head")]


@pytest.mark.parametrize(("loss", "method"), CASES)
def test_each_loss_and_method_trains_and_evaluates_through_the_stages(
    loss: str, method: str, source: ModelSource, folder: Path, tmp_path: Path
) -> None:
    tokenized = tokenized_for(loss, source, folder)
    assert tokenized.options["paired"] == (loss != "kto")
    assert tokenized.metrics() == {"pref_dropped_rows": 0, "pref_dropped_identical": 0}
    settings = METHODS[method].settings(name=method)
    adapted = apply_method(source, settings, "preference", tokenized, str(tmp_path), seed=0)
    lr = 3e-2 if method in ("prefix", "prompt", "ia3") else 5e-3
    train = TrainSettings(max_steps=4, batch_size=4, learning_rate=lr, save_steps=4, logging_steps=1)
    trained = train_model(adapted, tokenized, train, a_run(tmp_path))
    losses = [value for _, value in trained.loss_history]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    if method in STARTS_AS_BASE and loss in ("sigmoid", "kto"):
        # Policy == reference at step 1: DPO's loss is log 2, KTO's 1 - sigmoid(0) (TRL's values there).
        assert losses[0] == pytest.approx(math.log(2) if loss == "sigmoid" else 0.5, abs=1e-4)
    metrics = evaluate_model(trained, tokenized, a_run(tmp_path), batch_size=8)
    expected = OBJECTIVES["preference"].metric_names(
        validate_config({"task": "preference", "data": {"train": "x"}, "preference": {"loss": loss}})
    )
    assert set(expected) <= set(metrics) and all(math.isfinite(metrics[k]) for k in expected)
    if loss != "kto":
        assert 0 <= metrics["eval_pair_accuracy"] <= 1 and 0 <= metrics["eval_reward_accuracy"] <= 1
    if loss in ("sigmoid", "ipo", "hinge") and method in STARTS_AS_BASE:
        assert metrics["eval_reward_margin"] != 0, "the trained policy differs from its reference"


def test_the_base_is_its_own_reference(source: ModelSource, folder: Path) -> None:
    tokenized = tokenized_for("sigmoid", source, folder)
    base = evaluate_base(source, tokenized, batch_size=8)
    assert set(base) == {
        "base_eval_loss",
        "base_eval_pair_accuracy",
        "base_eval_logps_chosen",
        "base_eval_logps_rejected",
    }
    assert base["base_eval_loss"] == pytest.approx(math.log(2), abs=1e-5)  # zero margin on every pair


def test_config_checks_name_the_key() -> None:
    check = OBJECTIVES["preference"].check

    def problems(**sections: object) -> list[str]:
        return check(validate_config({"task": "preference", "data": {"train": "x.jsonl"}, **sections}))

    assert problems() == []
    assert any("train.batch_size" in p for p in problems(preference={"loss": "kto"}, train={"batch_size": 1}))
    assert problems(preference={"loss": "kto"}, train={"batch_size": 2}) == []
    assert any("preference.template" in p for p in problems(preference={"template": "missing.jinja"}))
    with pytest.raises(UserInputError, match="preference: only task preference reads this section"):
        validate_config({"data": {"train": "x.jsonl"}, "preference": {"loss": "ipo"}})
    with pytest.raises(UserInputError, match=r"data\.columns"):
        validate_config({"task": "preference", "data": {"train": "x.jsonl", "columns": {"answer": "a"}}})
    with pytest.raises(UserInputError, match=r"train\.packing"):
        validate_config({"task": "preference", "data": {"train": "x.jsonl"}, "train": {"packing": True}})


def adaptflow(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, in a process of its own."""
    return subprocess.run([str(BIN / "adaptflow"), *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_dpo_runs_registers_and_predicts_and_bad_input_exits_2(
    tmp_path: Path, tiny_model: str, mlflow_store: str
) -> None:
    identical = {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}  # dropped when loaded, and counted
    data = write_rows(tmp_path / "pairs.jsonl", [*PAIRS, identical])
    run_config = write_config(
        tmp_path / "preference.yaml",
        model={"name_or_path": tiny_model},
        task="preference",
        data={"train": str(data), "max_length": 64, "eval_fraction": 0.25},
        preference={"loss": "sigmoid", "beta": 0.1, "max_new_tokens": 8},
        method={"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        train={"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 8, "logging_steps": 2},
        registry={"name": "pref", "promote": {"metric": "eval_reward_accuracy", "mode": "max"}},
    )
    done = adaptflow("run", str(run_config), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["task"] == "preference"
    metrics = result["metrics"]
    for key in ("eval_loss", "eval_reward_accuracy", "eval_pair_accuracy", "base_eval_pair_accuracy"):
        assert isinstance(metrics[key], float), key
    assert (metrics["pref_dropped_rows"], metrics["pref_dropped_identical"]) == (0, 1)
    reports = Path(result["run_dir"]) / "reports"
    report = json.loads((reports / "eval_report.json").read_text())
    assert report["flipped"]["pairs"] == 6 and (reports / "reward_margins.png").stat().st_size > 0
    version = MlflowClient().get_model_version_by_alias("pref", "champion")
    run = MlflowClient().get_run(version.run_id)
    assert run.data.metrics["base_eval_pair_accuracy"] == metrics["base_eval_pair_accuracy"]
    assert run.data.params["pref.template"] == "plain"  # the tiny tokenizer has no chat template of its own

    question = json.dumps([{"role": "user", "content": PAIRS[0]["prompt"]}])
    done = adaptflow("predict", "models:/pref@champion", "--messages", question, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])["predictions"][0]
    assert isinstance(answer, str) and "###" not in answer, "predict answers the chat with the response only"

    KTO = {"preference.loss": "kto", "registry.promote.metric": "eval_label_accuracy"}  # kto has no reward accuracy
    bad_inputs = {
        "no-rejected": ([{"prompt": "Hi", "chosen": "Hello"}] * 8, {}, "a 'rejected' column beside 'chosen'"),
        "kto-on-pairs": (PAIRS, KTO, "preference.loss: kto takes unpaired rows"),
        "text-label": (
            [{**row, "label": "yes"} for row in UNPAIRED],
            KTO,
            "'label' must be true or false",
        ),
    }
    # Refused before any run opens: the data's format read from its first rows (preflight, `Objective.check`).
    before_run = ("no-rejected", "kto-on-pairs", "pair-loss-on-unpaired")
    bad_inputs["pair-loss-on-unpaired"] = (UNPAIRED, {}, "preference.loss: sigmoid takes pairs")
    for name, (rows, overrides, message) in bad_inputs.items():
        bad = write_rows(tmp_path / f"{name}.jsonl", rows)
        sets = [f"data.train={bad}", f"registry.name=pref-{name}", *(f"{k}={v}" for k, v in overrides.items())]
        runs = len(MlflowClient().search_runs([run.info.experiment_id]))
        done = adaptflow("run", str(run_config), *[a for s in sets for a in ("--set", s)])
        assert done.returncode == 2, (name, done.stderr[-3000:])
        assert message in done.stderr, (name, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
        assert not MlflowClient().search_registered_models(f"name = 'pref-{name}'")
        if name in before_run:
            assert len(MlflowClient().search_runs([run.info.experiment_id])) == runs, f"{name}: a run was opened"
            assert "which loss kto takes" in done.stderr or "take pairs" in done.stderr or name == "no-rejected"
    assert not [r for r in MlflowClient().search_runs([run.info.experiment_id]) if r.info.status == "RUNNING"]
