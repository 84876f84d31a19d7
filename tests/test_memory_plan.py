"""The memory planner (tasks/memory.py): estimates checked against measured peaks, every method and task planned,
runs that cannot fit refused before anything is loaded, grid trials that cannot fit skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config

from adapters_impl import METHODS, ApplyContext, count_parameters, get_method
from benchmarks.memory_plan import build_model, measured_peak
from tasks.config import RunConfig, apply_overrides, validate_config
from tasks.memory import Device, optimizer_state_bytes, parse_bytes, plan
from tasks.modeling import load_base_model, load_tokenizer, resolve_model
from tasks.objectives import OBJECTIVES, tasks_of
from tasks.trials import expand_grid, split_fitting

CPU = Device("cpu", "cpu", 2**40, False)


@pytest.fixture(scope="module")
def llama30m(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The benchmark's 27M-parameter Llama (hidden 512, 6 layers, vocab 8000) with the tiny model's tokenizer."""
    folder = tmp_path_factory.mktemp("llama30m")
    build_model(folder)
    return str(folder)


def run_config(
    model: str, method: dict[str, Any], task: str = "causal_lm", grid: dict[str, Any] | None = None, **train: Any
) -> RunConfig:
    return RunConfig.model_validate(
        {
            "task": task,
            "model": {"name_or_path": model},
            "method": method,
            "data": {"train": "unused.jsonl", "max_length": train.pop("max_length", 256)},
            "train": {"max_steps": 2, **train},
            "grid": grid,
        }
    )


@pytest.mark.parametrize(
    ("method", "task", "checkpointing"),
    [("lora", "causal_lm", False), ("full", "causal_lm", True)],
)
def test_the_planned_peak_is_within_25_percent_of_the_measured_one(
    llama30m: str, method: str, task: str, checkpointing: bool
) -> None:
    config = run_config(
        llama30m, {"name": method}, task, batch_size=8, max_length=256, gradient_checkpointing=checkpointing
    )
    planned = plan(config, CPU)
    measured = measured_peak(config)
    # The batch's part (activations and backward's workspace) outweighs the weights: it is what the pass measures.
    assert planned.footprint.activations + planned.footprint.workspace > planned.footprint.weights
    assert 0.75 <= planned.peak_bytes / measured <= 1.25, (planned.describe(), measured)


@pytest.mark.parametrize(("method", "task"), [(m, t) for m, method in METHODS.items() for t in tasks_of(method)])
def test_every_method_and_task_is_planned_with_the_parameters_the_run_trains(
    tiny_model: str, method: str, task: str
) -> None:
    config = run_config(tiny_model, {"name": method}, task, batch_size=4, max_length=32)
    planned = plan(config, CPU)
    source = resolve_model(config.model)
    settings = get_method(method)
    labels = ["a", "b"] if task == "classification" else None
    base = load_base_model(
        source, OBJECTIVES[task].head, load_tokenizer(source), labels, **settings.base_loading(config.method)
    )
    model = settings.apply(base, config.method, ApplyContext(task=task, model_path=source.name_or_path))
    trainable, _ = count_parameters(model)
    assert planned.trainable == trainable
    assert planned.fits and planned.footprint.activations > 0


def test_a_run_too_big_for_the_device_gets_settings_that_fit(tiny_model: str) -> None:
    config = run_config(tiny_model, {"name": "lora"}, batch_size=512, max_length=512)
    small = Device("cpu", "cpu", parse_bytes("1GiB"), False)
    planned = plan(config, small)
    assert not planned.fits and planned.peak_bytes > 0.9 * small.free
    assert planned.suggestions and planned.suggestions[0][0].startswith("train.batch_size=")
    for option in planned.suggestions:  # each suggestion is a set of --set overrides that plans within the memory
        suggested = validate_config(apply_overrides(config.model_dump(mode="json"), option))
        assert plan(suggested, small, suggest=0).fits, option


def test_optimizer_state_by_name() -> None:
    assert optimizer_state_bytes(None) == optimizer_state_bytes("adamw_torch_fused") == 8
    assert optimizer_state_bytes("paged_adamw_8bit") == 2
    assert optimizer_state_bytes("sgd") == 0


def test_grid_trials_that_cannot_fit_are_skipped_with_their_estimate(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = {"r": [2], "alpha": [8], "target_modules": [["q_proj"], "all-linear"]}
    config = run_config(tiny_model, {"name": "lora"}, grid=grid, batch_size=4, max_length=64)
    specs = expand_grid(config)
    peaks = [plan(spec.config, CPU).peak_bytes for spec in specs]
    assert peaks[0] < peaks[1]
    between = (peaks[0] + peaks[1]) / 2 / 0.9
    monkeypatch.setattr("tasks.memory.this_device", lambda: Device("cpu", "cpu", int(between), False))
    fitting, skipped = split_fitting(specs)
    assert [s.index for s in fitting] == [0]
    assert [s.index for s in skipped] == [1] and skipped[0].status == "skipped"
    assert "would not fit in memory: estimated peak" in str(skipped[0].error)


@pytest.mark.slow
def test_a_run_that_cannot_fit_exits_2_before_anything_is_written(
    tmp_path: Path, tiny_model: str, stories_file: Path
) -> None:
    config = write_config(
        tmp_path / "huge.yaml",
        model={"name_or_path": tiny_model},
        method={"name": "lora"},
        data={"train": str(stories_file), "max_length": 512},  # the model's whole context
        train={"batch_size": 200000, "max_steps": 1, "output_dir": str(tmp_path / "runs")},
    )
    adaptflow = str(Path(sys.executable).with_name("adaptflow"))
    done = subprocess.run([adaptflow, "run", str(config), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "would not fit in memory" in done.stderr and "--set train.batch_size=" in done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    import mlflow

    assert mlflow.search_runs(search_all_experiments=True).empty  # no MLflow run was opened


def test_preference_plans_two_sequences_per_pair_and_full_s_frozen_reference(tiny_model: str) -> None:
    """Hand-worked against causal_lm on the same model: a pair is two sequences (so the activations and workspace
    of a batch of B pairs are causal_lm's at 2B rows); `full` holds a frozen reference copy of the starting model
    (every parameter in the base's fp32 on CPU: the bytes of full's own weights), a reference-free loss (simpo)
    none, an adapter method none (its reference is the adapter switched off), kto one sequence per row."""

    def planned(task: str, method: str, batch: int, **preference: Any) -> Any:
        config = run_config(tiny_model, {"name": method}, task, batch_size=batch, max_length=32)
        if preference:
            config = validate_config({**config.model_dump(mode="json"), "preference": preference})
        return plan(config, CPU, suggest=0)

    causal, pairs = planned("causal_lm", "full", 8), planned("preference", "full", 4)
    assert pairs.footprint.reference == pairs.parameters * 4 == causal.footprint.weights
    assert (pairs.footprint.activations, pairs.footprint.workspace) == (
        causal.footprint.activations,
        causal.footprint.workspace,
    )
    assert pairs.peak_bytes == causal.peak_bytes + pairs.footprint.reference
    assert "reference" in pairs.describe()
    assert planned("preference", "full", 4, loss="simpo").footprint.reference == 0
    kto = planned("preference", "full", 8, loss="kto")
    assert kto.footprint.reference == pairs.footprint.reference
    assert kto.footprint.activations == causal.footprint.activations
    lora_causal, lora_pairs = planned("causal_lm", "lora", 8), planned("preference", "lora", 4)
    assert lora_pairs.footprint.reference == 0
    assert lora_pairs.footprint.activations == lora_causal.footprint.activations
