"""One stage sequence (tasks/sequence.py) for the single run, every grid trial and every worker node."""

from __future__ import annotations

import ast
import inspect
import textwrap
from types import SimpleNamespace
from typing import Any

from flows import grid as grid_flow
from flows import pipeline
from tasks import sequence
from tasks import trials as grid_trials
from tasks.config import validate_config

STAGE_FUNCTIONS = {"load_data", "tokenize_dataset", "apply_method", "train_model", "evaluate_model"}


def _calls(function: Any) -> tuple[set[str], set[str]]:
    """(functions of tasks.sequence it calls, stage functions it calls directly, by any path)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    through_sequence, direct = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "sequence":
                through_sequence.add(func.attr)
            elif isinstance(func, ast.Attribute) and func.attr in STAGE_FUNCTIONS:
                direct.add(func.attr)
            elif isinstance(func, ast.Name) and func.id in STAGE_FUNCTIONS:
                direct.add(func.id)
    return through_sequence, direct


def test_run_grid_trial_and_worker_node_go_through_the_one_sequence() -> None:
    """No caller runs a stage of the sequence by itself: a stage added to the sequence reaches all of them."""
    callers = {
        "single run": (pipeline.finetune, {"load_data", "tokenize", "train_and_evaluate"}),
        "worker node": (pipeline.worker_node, {"load_data", "tokenize", "train_and_evaluate"}),
        "grid parent": (grid_flow.lora_grid, {"load_data", "tokenize"}),
        "grid trial": (grid_trials._train_trial, {"train_and_evaluate"}),
    }
    for name, (function, expected) in callers.items():
        through_sequence, direct = _calls(function)
        assert expected <= through_sequence, f"{name} skips {sorted(expected - through_sequence)} of the sequence"
        assert not direct, f"{name} runs {sorted(direct)} outside the sequence"


def test_the_sequence_runs_its_stages_in_order_with_one_set_of_arguments(tmp_path: Any) -> None:
    config = validate_config({"task": "instruction", "data": {"train": "x.jsonl", "max_length": 64}})
    seen: list[tuple[str, tuple[Any, ...]]] = []

    def record(name: str, result: Any) -> Any:
        def stage(*args: Any) -> Any:
            seen.append((name, args))
            return result

        return stage

    adapted = SimpleNamespace(mergeable=True)
    calls = sequence.StageCalls(
        load_data=record("load", "data"),
        tokenize_dataset=record("tokenize", "tokenized"),
        apply_method=record("apply-method", adapted),
        train_model=record("train", "trained"),
        evaluate_model=record("evaluate", {"eval_loss": 1.0}),
    )
    run = SimpleNamespace(run_dir=str(tmp_path))
    data = sequence.load_data(config, tmp_path, calls)
    tokenized = sequence.tokenize(config, data, "source", tmp_path, calls)  # type: ignore[arg-type]
    done = sequence.train_and_evaluate(config, "source", tokenized, run, calls)  # type: ignore[arg-type]
    assert [name for name, _ in seen] == list(sequence.STAGES)
    assert done.metrics == {"eval_loss": 1.0} and done.adapted is adapted and done.trained == "trained"
    tokenize_args = seen[1][1]
    assert tokenize_args[2:4] == ("instruction", 64) and tokenize_args[5] == config.task_options()
    assert seen[0][1][1] is config.objective  # the objective travels resolved, not as a name

    seen.clear()  # a pruned trial going on (its adapter given) and a worker node (no evaluation)
    worker = calls.but(evaluate_model=None)
    sequence.train_and_evaluate(config, "source", tokenized, run, worker, stop_at=5, adapted=adapted)  # type: ignore[arg-type]
    assert [name for name, _ in seen] == ["train"] and seen[0][1][-1] == 5
