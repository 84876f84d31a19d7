"""Task preference in the grid (issue 27 item 7): `grid.beta` and `grid.loss` as dimensions beside r / alpha /
target modules (declared by the objective, refused for other tasks), each trial training with its own loss
settings, pruned on eval_reward_accuracy and promoted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_config
from mlflow.tracking import MlflowClient
from test_preference import PAIRS, write_rows

from flows.cli import main
from tasks.config import validate_config
from tasks.errors import UserInputError
from tasks.grid_report import results_table
from tasks.objectives import OBJECTIVES
from tasks.tokenization import TokenizedRef
from tasks.trials import TrialResult, expand_grid, trial_tokenized

PREFERENCE = {"task": "preference", "data": {"train": "x.jsonl"}}
GRID = {"r": [2, 4], "alpha": [8], "target_modules": [["q_proj"]]}


def test_beta_and_loss_expand_the_grid_and_name_the_trials() -> None:
    config = validate_config({**PREFERENCE, "grid": {**GRID, "beta": [0.1, 0.5], "loss": ["sigmoid", "ipo"]}})
    specs = expand_grid(config)
    assert config.grid.size == len(specs) == 8
    assert specs[1].name == "lora r=2 alpha=8 targets=q_proj beta=0.1 loss=ipo"
    assert {(s.params["beta"], s.params["loss"]) for s in specs} == {
        (b, loss) for b in (0.1, 0.5) for loss in ("sigmoid", "ipo")
    }
    for spec in specs:  # each trial's own section, and its loss settings in the options its loss reads
        assert (spec.config.preference.beta, spec.config.preference.loss) == (spec.params["beta"], spec.params["loss"])
        tokenized = TokenizedRef(
            train_dir="t", eval_dir="e", task="preference", train_tokens=1, eval_tokens=1, options=config.task_options()
        )
        options = trial_tokenized(tokenized, spec).options
        assert (options["beta"], options["loss"]) == (spec.params["beta"], spec.params["loss"])
    # The table and heatmaps show the dimension (one heatmap per beta x loss).
    results = [TrialResult(index=s.index, name=s.name, params=s.params, status="failed") for s in specs]
    assert {"beta", "loss"} <= set(results_table(results, config.grid.select).columns)
    # Without the objective's dimensions the trials are named as before.
    plain = expand_grid(validate_config({**PREFERENCE, "grid": GRID}))
    assert [s.name for s in plain] == ["lora r=2 alpha=8 targets=q_proj", "lora r=4 alpha=8 targets=q_proj"]


def test_the_dimensions_are_the_objectives_and_checked_before_anything_runs(tmp_path: Path) -> None:
    assert [d.name for d in OBJECTIVES["preference"].grid_dimensions] == ["beta", "loss"]
    with pytest.raises(UserInputError, match=r"grid\.beta: only task preference reads it \(task is 'causal_lm'\)"):
        validate_config({"data": {"train": "x.jsonl"}, "grid": {"beta": [0.1]}})
    with pytest.raises(UserInputError, match=r"grid\.loss\.0: Input should be 'sigmoid'"):
        validate_config({**PREFERENCE, "grid": {"loss": ["dpo"]}})
    with pytest.raises(UserInputError, match=r"grid\.beta\.0: Input should be greater than 0"):
        validate_config({**PREFERENCE, "grid": {"beta": [0]}})
    # kto reports no reward accuracy: a grid over losses selects on what every trial reports.
    with pytest.raises(UserInputError, match="every trial of this grid reports eval_loss"):
        validate_config(
            {**PREFERENCE, "grid": {"loss": ["sigmoid", "kto"], "select": {"metric": "eval_reward_accuracy"}}}
        )
    check = OBJECTIVES["preference"].check
    mixed = validate_config({**PREFERENCE, "grid": {"loss": ["sigmoid", "kto"]}})
    assert any(p.startswith("grid.loss: kto takes unpaired labelled rows") for p in check(mixed))
    pairs = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    kto = validate_config({**PREFERENCE, "data": {"train": str(pairs)}, "grid": {"loss": ["kto"]}})
    assert any(p.startswith("grid.loss: kto takes unpaired rows") for p in check(kto))


@pytest.mark.slow
def test_a_grid_over_beta_and_r_prunes_on_reward_accuracy_and_promotes_the_best(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    config = write_config(
        tmp_path / "grid.yaml",
        model={"name_or_path": tiny_model},
        task="preference",
        data={"train": str(data), "max_length": 48, "eval_fraction": 0.25},
        preference={"max_new_tokens": 4},
        method={"name": "lora"},
        train={"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 2},
        registry={"name": "pref-grid", "promote": {"metric": "eval_reward_accuracy", "mode": "max"}},
        bias_probe={"suite": None},
        grid={
            "r": [2, 4],
            "alpha": [8],
            "target_modules": [["q_proj", "v_proj"]],
            "beta": [0.05, 2.0],
            "max_parallel": 2,
            "select": {"metric": "eval_reward_accuracy", "mode": "max"},
            "prune": {"eta": 2, "min_steps": 2, "metric": "eval_loss", "mode": "min"},
        },
    )
    assert main(["grid", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trials = result["trials"]
    assert [t["params"]["beta"] for t in trials] == [0.05, 2.0, 0.05, 2.0]
    assert [t["name"].split()[-1] for t in trials] == ["beta=0.05", "beta=2", "beta=0.05", "beta=2"]
    statuses = sorted(t["status"] for t in trials)
    assert statuses == ["ok", "ok", "pruned", "pruned"], trials
    for t in trials:
        assert [r["steps"] for r in t["rungs"]] == ([2, 4] if t["status"] == "ok" else [2])
    # Each rung kept the better half by eval_loss.
    first = sorted(trials, key=lambda t: t["rungs"][0]["value"])
    assert {t["index"] for t in first[:2]} == {t["index"] for t in trials if t["status"] == "ok"}
    finished = [t for t in trials if t["status"] == "ok"]
    best = max(finished, key=lambda t: (t["metrics"]["eval_reward_accuracy"], -t["metrics"]["trainable_params"]))
    assert result["best"]["index"] == best["index"] and (result["steps_total"], result["steps_saved"]) == (12, 4)
    # Each trial trained and was evaluated with its own beta: the reward margin is beta x how far the policy's
    # log-probs moved from the reference's (the base's, on the same held-out pairs).
    client = MlflowClient()
    base = client.get_run(best["run_id"]).data.metrics
    for t in trials:
        assert float(client.get_run(t["run_id"]).data.params["preference.beta"]) == t["params"]["beta"]
        m = t["metrics"]
        moved = (m["eval_logps_chosen"] - base["base_eval_logps_chosen"]) - (
            m["eval_logps_rejected"] - base["base_eval_logps_rejected"]
        )
        assert m["eval_reward_margin"] / moved == pytest.approx(t["params"]["beta"], rel=0.05), t
    assert result["promoted"] and result["aliases"] == ["champion"]
    version = client.get_model_version("pref-grid", result["model_version"])
    assert version.run_id == best["run_id"] and float(version.tags["param.beta"]) == best["params"]["beta"]
    assert "| alpha | beta | status |" in result["table"]
