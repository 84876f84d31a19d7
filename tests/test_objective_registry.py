"""The objective registry is the one source of truth for `task:`: the config's allowed values, `adaptflow methods`
and the stages' dispatch follow it, and adding an objective is one module + one registry line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters_impl import METHODS
from tasks.config import RunConfig
from tasks.objectives import OBJECTIVES, get_objective, objective_of_architectures, tasks_of

# A throwaway objective, registered the way a contributor would (a module's OBJECTIVE + one registry line), in a
# fresh interpreter so that every registry-derived type is built with it.
THROWAWAY = """
import dataclasses, json
import tasks.objectives
from tasks.objectives import causal_lm

tasks.objectives.OBJECTIVES["toy"] = dataclasses.replace(causal_lm.OBJECTIVE, name="toy", summary="a toy objective")

from flows.cli import main
from tasks.config import RunConfig
from tasks.tokenization import make_collator

config = RunConfig.model_validate({"data": {"train": "x.jsonl"}, "task": "toy", "method": {"name": "lora"}})
print(json.dumps({"task": config.task, "collator": type(make_collator(None, "toy")).__name__}))
main(["methods", "--json"])
"""


def test_the_config_accepts_exactly_the_registered_objectives() -> None:
    for name in OBJECTIVES:
        assert RunConfig.model_validate({"data": {"train": "x.jsonl"}, "task": name}).task == name
    with pytest.raises(ValidationError, match="causal_lm"):
        RunConfig.model_validate({"data": {"train": "x.jsonl"}, "task": "translation"})


def test_methods_list_the_objectives_they_support() -> None:
    assert tasks_of(METHODS["head"]) == ("classification",)
    assert tasks_of(METHODS["lora"]) == tuple(OBJECTIVES)
    assert objective_of_architectures(["LlamaForSequenceClassification"]) is get_objective("classification")
    assert objective_of_architectures(["LlamaForCausalLM"]) is get_objective("causal_lm")
    assert objective_of_architectures([]) is get_objective("causal_lm")


def test_a_new_objective_is_one_module_and_one_registry_line() -> None:
    done = subprocess.run(
        [sys.executable, "-c", THROWAWAY],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, listing = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert first == {"task": "toy", "collator": "DataCollatorForSeq2Seq"}
    toy = next(o for o in listing["tasks"] if o["name"] == "toy")
    assert toy["summary"] == "a toy objective" and "lora" in toy["methods"]
    assert all("toy" in m["tasks"] for m in listing["methods"] if m["name"] != "head")
    # Every key the listing had before objectives had a registry is still there.
    assert set(listing) >= {"command", "methods"}
    assert set(listing["methods"][0]) >= {"name", "summary", "flow", "tasks", "not_supported", "mergeable", "settings"}
