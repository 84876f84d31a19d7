"""The comparison grid: expansion and selection, then real grids on a local process pool and a Dask LocalCluster."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config
from mlflow.tracking import MlflowClient

from flows.cli import main
from tasks.config import PruneSettings, RunConfig, SelectSettings, resolve_paths
from tasks.grid_report import markdown_table, results_table
from tasks.halving import TrialSchedule
from tasks.load import load_data
from tasks.modeling import resolve_model
from tasks.tokenization import tokenize_dataset
from tasks.tracking import RunRef, start_run
from tasks.trials import TrialResult, expand_grid, pareto_front, run_trial, rung_steps, select_best, survivors


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def trial(index: int, loss: float | None, params: int, r: int = 4) -> TrialResult:
    status = "ok" if loss is not None else "failed"
    metrics = {"eval_loss": loss, "trainable_params": params} if loss is not None else {}
    return TrialResult(
        index=index,
        name=f"t{index}",
        params={"method": "lora", "r": r, "alpha": 8, "target_modules": ["q_proj"]},
        status=status,
        metrics=metrics,
        error=None if loss is not None else "boom",
    )


def test_grid_expands_to_the_product_with_method_settings_kept() -> None:
    config = RunConfig.model_validate(
        {
            "data": {"train": "x.jsonl"},
            "method": {"name": "lora", "dropout": 0.2},
            "grid": {"r": [4, 8], "alpha": [8, 16, 32], "target_modules": [["q_proj"], "all-linear"]},
        }
    )
    specs = expand_grid(config)
    assert len(specs) == config.grid.size == 12
    assert [s.index for s in specs] == list(range(12))
    assert {(s.params["r"], s.params["alpha"], str(s.params["target_modules"])) for s in specs} == {
        (r, a, str(t)) for r in (4, 8) for a in (8, 16, 32) for t in (["q_proj"], "all-linear")
    }
    assert all(s.config.method.dropout == 0.2 and s.config.grid is None for s in specs)
    both = config.model_copy(update={"grid": config.grid.model_copy(update={"method": ["lora", "qlora"]})})
    assert [s.config.method.name for s in expand_grid(both)].count("qlora") == 12


def test_grid_needs_a_low_rank_method() -> None:
    with pytest.raises(ValueError, match="grid: a grid over rank, alpha and target modules needs a low-rank method"):
        RunConfig.model_validate({"data": {"train": "x.jsonl"}, "method": {"name": "prefix"}, "grid": {}})


def test_selection_ties_go_to_fewer_parameters_and_failures_never_win() -> None:
    results = [trial(0, 2.0, 800), trial(1, 1.5, 3200), trial(2, 1.5, 1600), trial(3, None, 10)]
    assert select_best(results, SelectSettings()).index == 2
    assert select_best(results, SelectSettings(metric="eval_loss", mode="max")).index == 0
    assert select_best([trial(0, None, 1)], SelectSettings()) is None
    assert select_best([trial(0, float("nan"), 1), trial(1, 3.0, 5)], SelectSettings()).index == 1


def test_pareto_front_keeps_only_undominated_trials() -> None:
    results = [trial(0, 2.0, 800), trial(1, 1.5, 3200), trial(2, 1.5, 1600), trial(3, 2.5, 1600)]
    assert pareto_front(results, SelectSettings()) == [0, 2]


def test_results_table_is_best_first_and_renders_as_markdown() -> None:
    table = results_table([trial(0, 2.0, 800), trial(1, None, 10), trial(2, 1.0, 900)], SelectSettings())
    assert list(table["trial"]) == [2, 0, 1]
    markdown = markdown_table(table)
    assert markdown.splitlines()[0].startswith("| trial | method |") and "| failed |" in markdown


def grid_config(tmp_path: Path, tiny_model: str, stories_file: Path, **grid: object) -> Path:
    return write_config(
        tmp_path / "grid.yaml",
        model={"name_or_path": tiny_model},
        data={"train": str(stories_file), "max_length": 32, "eval_fraction": 0.2},
        method={"name": "lora"},
        train={"max_steps": 6, "batch_size": 8, "learning_rate": 3e-3, "logging_steps": 2},
        registry={"name": "grid"},
        bias_probe={"suite": None},  # probing the best is covered by the single-run tests
        # 2 good trials and one whose target module this model lacks: recorded as failed, the grid goes on.
        grid={"r": [2, 4], "alpha": [8], "target_modules": [["q_proj", "v_proj"]], "max_parallel": 2, **grid},
    )


def comparable(result: dict) -> list[tuple]:
    return [
        (t["index"], t["status"], round(t["metrics"].get("eval_loss", -1), 6), t["metrics"].get("trainable_params"))
        for t in result["trials"]
    ]


@pytest.mark.slow
def test_grid_locally_and_on_dask_registers_the_true_best_and_promotes_only_a_winner(
    tmp_path: Path,
    tiny_model: str,
    stories_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = grid_config(tmp_path, tiny_model, stories_file)
    shown: list[str] = []
    progress = logging.getLogger("adaptflow.grid")  # Prefect reconfigures the root logger; listen here
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())  # type: ignore[method-assign]
    progress.addHandler(handler)
    bad_target = ["--set", "grid.target_modules=[[q_proj, v_proj], [qkv]]"]
    assert main(["grid", str(config), *bad_target, "--json"]) == 0
    local = last_json(capsys.readouterr().out)
    progress.removeHandler(handler)
    assert len(shown) == 4 and shown[-1].startswith("[4/4 trials done]") and "best so far: trial" in shown[-1]

    statuses = [t["status"] for t in local["trials"]]
    assert statuses == ["ok", "ok", "failed", "failed"]
    assert "'qkv' is not a linear module" in local["trials"][2]["error"]
    ok = [t for t in local["trials"] if t["status"] == "ok"]
    true_best = min(ok, key=lambda t: (t["metrics"]["eval_loss"], t["metrics"]["trainable_params"]))
    assert local["best"]["index"] == true_best["index"]
    assert (local["aliases"], local["promoted"]) == (["champion"], True)

    client = MlflowClient()
    nested = client.search_runs(
        [client.get_run(local["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{local['parent_run_id']}'",
    )
    assert len(nested) == 4 and {r.info.status for r in nested} == {"FINISHED", "FAILED"}
    assert len({r.info.run_id for r in nested}) == 4
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as prefect:  # trial tasks named by their settings, not trial-473
        names = {
            t.name
            for t in prefect.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="trial ")))
        }
    assert {f"trial {t['index']}: {t['name']}" for t in local["trials"]} <= names
    version = client.get_model_version("grid", local["model_version"])
    assert version.run_id == true_best["run_id"]
    assert version.tags["grid_parent_run_id"] == local["parent_run_id"]
    assert version.tags["param.r"] == str(true_best["params"]["r"])
    reports = {a.path for a in client.list_artifacts(local["parent_run_id"], "reports")}
    assert {
        "reports/grid_results.csv",
        "reports/grid_results.md",
        "reports/grid_heatmap.png",
        "reports/grid_pareto.png",
        "reports/grid_loss_curves.png",
    } <= reports
    rows = list(
        csv.DictReader(
            io.StringIO(Path(client.download_artifacts(local["parent_run_id"], "reports/grid_results.csv")).read_text())
        )
    )
    assert rows[0]["trial"] == str(true_best["index"]) and len(rows) == 4

    # The same grid on a Dask LocalCluster of 2 worker processes: the same table, and the same winner on the same
    # content, so the same version: reported, not registered again nor compared with itself.
    assert main(["grid", str(config), *bad_target, "--set", "grid.runner=dask", "--json"]) == 0
    dask = last_json(capsys.readouterr().out)
    assert comparable(dask) == comparable(local)
    assert dask["model_version"] == local["model_version"] and dask["aliases"] == ["champion"]
    assert "already the champion" in dask["promotion"]

    # A deliberately worse QLoRA grid: registered, @challenger, the champion stays; its winner went through the
    # same stages as a run (a lossy merge reports what serving the merged model costs).
    worse = ["--set", "train.learning_rate=1e-7", "--set", "grid.r=[2]", "--set", "grid.max_parallel=1"]
    assert main(["grid", str(config), *worse, "--set", "grid.method=[qlora]", "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    best_metrics = client.get_run(result["parent_run_id"]).data.metrics
    assert {"best_merged_eval_loss", "best_merge_eval_loss_gap", "best_merge_max_abs_diff"} <= set(best_metrics)
    assert result["aliases"] == ["challenger"] and result["champion_version"] == local["model_version"]
    assert str(client.get_model_version_by_alias("grid", "champion").version) == local["model_version"]

    # `adaptflow promote` makes the same decision for the newest version.
    assert main(["promote", "--name", "grid", "--json"]) == 0
    decision = last_json(capsys.readouterr().out)
    assert (decision["version"], decision["alias"]) == (result["model_version"], "challenger")


@pytest.mark.slow
def test_a_grid_where_every_trial_fails_exits_1_with_a_summary(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = grid_config(tmp_path, tiny_model, stories_file, target_modules=[["qkv"]], r=[2], max_parallel=1)
    assert main(["grid", str(config), "--json"]) == 1
    captured = capsys.readouterr()
    assert "all 1 trials failed: trial 0" in captured.err and "Traceback" not in captured.err
    assert last_json(captured.out)["status"] == "failed"
    assert MlflowClient().search_registered_models() == []


def test_promote_unknown_model_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["promote", "--name", "nope", "--json"]) == 2
    assert "--name: no registered model called 'nope'" in capsys.readouterr().err


def test_prune_settings_bad_input_exits_2_naming_the_key(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = grid_config(tmp_path, tiny_model, stories_file)
    for setting, message in [
        ("grid.prune={eta: 1}", "grid.prune.eta: Input should be greater than or equal to 2"),
        ("grid.prune={min_steps: 6}", "grid.prune.min_steps: must be below train.max_steps (6) (got 6)"),
        ("grid.prune={min_steps: 9}", "grid.prune.min_steps: must be below train.max_steps (6) (got 9)"),
        ("grid.prune={strategy: hyperband}", "grid.prune.strategy: Input should be 'halving'"),
    ]:
        assert main(["grid", str(config), "--set", setting, "--json"]) == 2
        assert message in capsys.readouterr().err
    assert (
        main(
            [
                "grid",
                str(config),
                "--set",
                "grid.prune={}",
                "--set",
                "train.max_steps=null",
                "--set",
                "train.epochs=1",
                "--json",
            ]
        )
        == 2
    )
    assert "grid.prune: pruning trains to step counts; set train.max_steps" in capsys.readouterr().err


def halving(eta: int = 3, min_steps: int | None = None) -> PruneSettings:
    return PruneSettings(eta=eta, min_steps=min_steps)


def test_rung_steps_grow_by_eta_and_end_at_max_steps() -> None:
    assert rung_steps(90, halving(), 16) == [10, 30, 90]  # 3^2 <= 16 < 3^3: two halvings
    assert rung_steps(90, halving(), 27) == [3, 10, 30, 90]
    assert rung_steps(90, halving(), 2) == [90]  # nothing to halve with fewer trials than eta
    assert rung_steps(100, halving(eta=2), 8) == [12, 25, 50, 100]
    assert rung_steps(90, halving(min_steps=5), 16) == [5, 15, 45, 90]
    assert rung_steps(6, halving(eta=2), 64) == [1, 2, 3, 6]  # rounding never repeats a rung


def test_survivors_are_the_best_third_of_those_that_finished_the_rung() -> None:
    # 7 trials, one failed, one NaN: 5 ranked, ceil(5/3) = 2 go on; the tie at 1.5 goes to fewer parameters.
    results = [
        trial(0, 2.0, 800),
        trial(1, 1.5, 3200),
        trial(2, None, 10),
        trial(3, 1.5, 1600),
        trial(4, float("nan"), 5),
        trial(5, 1.2, 9000),
        trial(6, 3.0, 100),
    ]
    assert survivors(results, SelectSettings(), eta=3) == [3, 5]
    assert survivors(results, SelectSettings(mode="max"), eta=2) == [0, 3, 6]  # 3.0, 2.0, then the tie
    assert survivors([trial(0, None, 1)], SelectSettings(), eta=3) == []
    assert survivors([trial(0, 1.0, 1)], SelectSettings(), eta=3) == [0]


def test_the_schedule_halves_by_eta_each_rung_and_a_resumed_one_replays_the_logged_rungs(tmp_path: Path) -> None:
    """The rung loop the grid flow drives: 8 trials, eta 2, max_steps 8 -> rungs at 1, 2, 4, 8 steps with 8, 4,
    2, 1 trials; the pruned ones are tagged in their MLflow runs. A resumed schedule whose trials had logged the
    first rung trains nothing at that rung and ranks as the interrupted one did."""
    config = RunConfig.model_validate(
        {
            "data": {"train": "x.jsonl"},
            "method": {"name": "lora"},
            "train": {"max_steps": 8},
            "grid": {"r": [1, 2, 4, 8], "alpha": [8, 16], "target_modules": [["q_proj"]], "prune": {"eta": 2}},
        }
    )
    specs = expand_grid(config)
    assert config.grid is not None and config.grid.prune is not None and len(specs) == 8
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("schedule", artifact_location=str(tmp_path / "artifacts"))
    run_ids = [client.create_run(experiment).info.run_id for _ in specs]
    parent = RunRef(run_id=run_ids[0], experiment_id=experiment, tracking_uri=client.tracking_uri, run_dir="")
    loss = {spec.index: 1.0 + ((spec.index * 5) % 8) / 10 for spec in specs}  # distinct, not in index order

    def train(work: list, stop_at: int | None) -> list[TrialResult]:
        return [
            spec.outcome(
                "ok",
                steps=stop_at or 8,
                run_id=run_ids[spec.index],
                run_dir=str(tmp_path),
                metrics={"eval_loss": loss[spec.index]},
                rungs=previous.rungs if previous else [],  # a trial goes on from its previous result
            )
            for spec, previous in work
        ]

    def drive(schedule: TrialSchedule) -> list[tuple[int | None, list[int]]]:
        trained = []
        while (rung := schedule.next_rung()) is not None:
            trained.append((rung.stop_at, [spec.index for spec, _ in rung.work]))
            schedule.record(train(rung.work, rung.stop_at))
        return trained

    schedule = TrialSchedule(specs, config.grid, 8, {}, parent)
    best_first = sorted(loss, key=loss.__getitem__)
    assert drive(schedule) == [
        (1, list(range(8))),
        (2, sorted(best_first[:4])),
        (4, sorted(best_first[:2])),
        (8, best_first[:1]),
    ]
    results = schedule.results()
    assert [r.index for r in results] == list(range(8))
    assert [r.status for r in results].count("ok") == 1 and results[best_first[0]].status == "ok"
    assert [len(r.rungs) for r in results] == [
        1 + best_first[:4].count(i) + best_first[:2].count(i) + best_first[:1].count(i) for i in range(8)
    ]
    tags = {i: client.get_run(run_ids[i]).data.tags.get("adaptflow.grid_status") for i in range(8)}
    assert {i for i, tag in tags.items() if tag == "pruned"} == set(best_first[1:])

    # Resumed after the first rung: every trial had logged it, so rung 1 trains nothing.
    recorded = {r.index: r.model_copy(update={"rungs": r.rungs[:1], "steps": 1}) for r in results}
    resumed = TrialSchedule(specs, config.grid, 8, recorded, parent)
    assert drive(resumed)[0] == (1, [])
    assert [r.status for r in resumed.results()] == [r.status for r in results]

    without_pruning = TrialSchedule(specs, config.grid.model_copy(update={"prune": None}), 8, {}, parent)
    assert drive(without_pruning) == [(None, list(range(8)))]


def test_a_trial_continued_across_rungs_ends_where_the_same_trial_unpruned_ends(
    tmp_path: Path, tiny_model: str, stories_file: Path
) -> None:
    """Pruning changes which trials go on, never the numbers of one that does: the continued trial resumes its
    optimizer, scheduler (of the full max_steps run), RNG and data position."""
    config = RunConfig.model_validate(
        {
            "model": {"name_or_path": tiny_model},
            "data": {"train": str(stories_file), "max_length": 32, "eval_fraction": 0.2},
            "method": {"name": "lora", "dropout": 0.1},
            "train": {"max_steps": 6, "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.3, "logging_steps": 1},
            "tracking": {"experiment": "prune"},
            "grid": {"r": [4], "alpha": [8], "target_modules": ["all-linear"]},
        }
    )
    config = resolve_paths(
        config.model_copy(update={"train": config.train.model_copy(update={"output_dir": str(tmp_path / "runs")})}),
        tmp_path,
    )
    source = resolve_model(config.model)
    data = load_data(config.data, config.objective, tmp_path / "cache" / "d")
    tokenized = tokenize_dataset(data, source, config.task, 32, tmp_path / "cache" / "t")
    parent = start_run(config, "parent")
    spec = expand_grid(config)[0]

    unpruned = run_trial(spec, source, tokenized, parent, None)
    first = run_trial(spec, source, tokenized, parent, None, stop_at=2)
    assert (first.status, first.steps) == ("ok", 2) and first.run_id != unpruned.run_id
    second = run_trial(spec, source, tokenized, parent, None, stop_at=4, previous=first)
    last = run_trial(spec, source, tokenized, parent, None, stop_at=6, previous=second)
    assert (last.status, last.steps, last.run_id) == ("ok", 6, first.run_id)
    assert last.trained is not None and last.trained.resumed_from_step == 4
    assert first.metrics["eval_loss"] != pytest.approx(last.metrics["eval_loss"])
    assert last.metrics["eval_loss"] == pytest.approx(unpruned.metrics["eval_loss"], rel=1e-6)
    history = MlflowClient().get_metric_history(first.run_id, "eval_loss")
    assert sorted(m.step for m in history if m.step) == [2, 4, 6]  # each rung's evaluation at its step (0: evaluate's)


@pytest.mark.slow
def test_a_pruned_grid_finishes_only_the_best_and_selects_among_those_that_reached_max_steps(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = grid_config(tmp_path, tiny_model, stories_file)
    # 4 trials, 2 failing (a module this model lacks); rungs at steps 3 and 6; the better half of those left go on.
    pruned = ["--set", "grid.target_modules=[[q_proj, v_proj], [qkv]]", "--set", "grid.prune={eta: 2, min_steps: 3}"]

    assert main(["grid", str(config), *pruned, "--set", "grid.prune.metric=eval_nope", "--json"]) == 2
    err = capsys.readouterr().err
    # Known before anything trains: the objective names its metrics (it was found only after a rung).
    assert "grid.prune.metric: 'eval_nope' is not a metric this run reports" in err and "eval_loss" in err
    assert MlflowClient().search_registered_models() == []

    assert main(["grid", str(config), *pruned, "--json"]) == 0
    local = last_json(capsys.readouterr().out)
    trials = local["trials"]
    assert [(t["status"], t["steps"]) for t in trials][2:] == [("failed", 0), ("failed", 0)]
    survivor, loser = sorted(trials[:2], key=lambda t: t["rungs"][0]["value"])
    assert (survivor["status"], survivor["steps"], loser["status"], loser["steps"]) == ("ok", 6, "pruned", 3)
    assert [r["steps"] for r in survivor["rungs"]] == [3, 6] and [r["steps"] for r in loser["rungs"]] == [3]
    assert survivor["rungs"][-1]["value"] == survivor["metrics"]["eval_loss"]
    assert local["best"]["index"] == survivor["index"]
    assert (local["steps_total"], local["steps_saved"]) == (9, 3)
    client = MlflowClient()
    assert client.get_model_version("grid", local["model_version"]).run_id == survivor["run_id"]
    assert client.get_run(loser["run_id"]).data.tags["adaptflow.grid_status"] == "pruned"
    reports = {a.path for a in client.list_artifacts(local["parent_run_id"], "reports")}
    assert {"reports/grid_rungs.csv", "reports/grid_rungs.md", "reports/grid_rungs.png"} <= reports
    rungs = Path(client.download_artifacts(local["parent_run_id"], "reports/grid_rungs.md")).read_text()
    assert rungs.splitlines()[0] == "| trial | name | status | steps | step 3 | step 6 |"
    # Rungs are rounds of the same fan-out as an unpruned grid, whose Dask runner gives the local table
    # (test_grid_locally_and_on_dask_registers_the_true_best_and_promotes_only_a_winner): not repeated here.


@pytest.mark.slow
def test_a_pruned_grid_killed_mid_rung_resumes_from_the_trials_checkpoints_to_the_same_table(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 3 trials one after another; rungs at steps 4 and 12: one trial goes on, checkpointing every 2 steps.
    config = grid_config(
        tmp_path, tiny_model, stories_file, r=[2, 4, 8], max_parallel=1, prune={"eta": 3, "min_steps": 4}
    )
    longer = ["--set", "train.max_steps=12", "--set", "train.save_steps=2"]
    assert main(["grid", str(config), *longer, "--json"]) == 0
    uninterrupted = last_json(capsys.readouterr().out)

    # The same grid in a separate process, SIGKILLed (with its process group) while the survivor is between rungs.
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    command = [str(Path(sys.executable).with_name("adaptflow")), "grid", str(config), *longer]
    child = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    runs = tmp_path / "runs"
    finished = {t["run_id"] for t in uninterrupted["trials"]}
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if any(
                p.parents[1].name not in finished for p in runs.glob("*/checkpoints/checkpoint-[68]/trainer_state.json")
            ):
                break
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    client = MlflowClient()
    experiment = client.get_experiment_by_name("adaptflow").experiment_id
    running = client.search_runs([experiment], "attributes.status = 'RUNNING'")
    (killed,) = [r for r in running if "mlflow.parentRunId" not in r.data.tags]  # SIGKILL: nobody could mark it
    assert main(["grid", str(config), *longer, "--resume", "--json"]) == 0
    resumed = last_json(capsys.readouterr().out)
    assert resumed["parent_run_id"] == killed.info.run_id
    nested = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{killed.info.run_id}'")
    assert len(nested) == 3, "every trial continued in its own run"
    assert comparable(resumed) == comparable(uninterrupted)
    assert [t["rungs"] for t in resumed["trials"]] == [t["rungs"] for t in uninterrupted["trials"]]
    assert (resumed["steps_total"], resumed["steps_saved"]) == (uninterrupted["steps_total"], 16) == (20, 16)
    for t in resumed["trials"]:  # the pruned trials' rung was taken as logged, not trained again
        steps = sorted(m.step for m in client.get_metric_history(t["run_id"], "eval_loss") if m.step)  # 0: finish's
        assert steps == ([4] if t["status"] == "pruned" else [4, 12])


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc: each process's parent)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_a_sigkilled_grid_takes_its_trial_workers_with_it(tmp_path: Path, tiny_model: str, stories_file: Path) -> None:
    """Only the grid's own process is killed (kill -9 PID): its workers trained on, for good, before."""
    config = grid_config(tmp_path, tiny_model, stories_file)
    longer = ["--set", "train.max_steps=400", "--set", "train.save_steps=5"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    command = [str(Path(sys.executable).with_name("adaptflow")), "grid", str(config), *longer]
    child = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None:
            if len({p.parents[1] for p in (tmp_path / "runs").glob("*/checkpoints/checkpoint-*")}) >= 2:  # both train
                break
            time.sleep(0.1)
        below = _descendants(child.pid)
        assert child.poll() is None and below, "the grid never started its trials"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in below):
            time.sleep(0.2)
        left = sorted(p for p in below if _alive(p))
        assert not left, f"processes outlived the grid: {[Path(f'/proc/{p}/cmdline').read_bytes()[:80] for p in left]}"
    finally:
        os.killpg(child.pid, signal.SIGKILL)


def test_a_resume_refuses_to_train_beside_a_live_worker_of_the_grid(tmp_path: Path) -> None:
    from tasks.errors import UserInputError
    from tasks.trials import TRIAL_LOCK, check_no_live_trials

    folder = tmp_path / "trial-run"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder / TRIAL_LOCK)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        recorded = {0: trial(0, 1.0, 10).model_copy(update={"run_dir": str(folder)})}
        with pytest.raises(UserInputError) as refused:
            check_no_live_trials(recorded, wait=0.5)
        assert "trial 0" in str(refused.value) and str(folder) in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    check_no_live_trials(recorded, wait=5)  # its process gone, the lock is free


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "to_group", "code"), [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)])
def test_ctrl_c_or_sigterm_during_a_rung_ends_the_grid_its_workers_and_their_runs_promptly(
    tmp_path: Path, tiny_model: str, stories_file: Path, signum: int, to_group: bool, code: int
) -> None:
    """Ctrl-C in a terminal (the whole group) hung forever; SIGTERM to the grid waited for the rung to end."""
    config = grid_config(tmp_path, tiny_model, stories_file, prune={"eta": 2, "min_steps": 200})
    longer = ["--set", "train.max_steps=400", "--set", "train.save_steps=5"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    command = [str(Path(sys.executable).with_name("adaptflow")), "grid", str(config), *longer]
    log = (tmp_path / "cli.log").open("w")
    child = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while len({p.parents[1] for p in (tmp_path / "runs").glob("*/checkpoints/checkpoint-*")}) < 2:  # both train
            assert child.poll() is None and time.monotonic() < deadline, "the trials never trained"
            time.sleep(0.1)
        below = _descendants(child.pid)
        os.killpg(child.pid, signum) if to_group else child.send_signal(signum)
        sent = time.monotonic()
        child.wait(timeout=120)
        took = time.monotonic() - sent
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in below):
            time.sleep(0.2)
        left = [p for p in below if _alive(p)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    output = (tmp_path / "cli.log").read_text()
    assert child.returncode == code, output[-3000:]
    assert took < 20, f"{took:.0f} s from the signal to the exit"
    assert not left, "processes outlived the grid"
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("adaptflow").experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"KILLED"}  # the grid's run and both trials'


@pytest.mark.slow
def test_grid_json_leaves_stdout_to_the_one_json_object(tmp_path: Path, tiny_model: str, stories_file: Path) -> None:
    """Trial workers printed the Trainer's log dicts ({'loss': ...}) on the grid's stdout: `| jq .` broke."""
    config = grid_config(tmp_path, tiny_model, stories_file)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    command = [str(Path(sys.executable).with_name("adaptflow")), "grid", str(config), "--json"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = done.stdout.strip().splitlines()
    assert json.loads(line)["command"] == "grid" and "'loss'" in done.stderr
