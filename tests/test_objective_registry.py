"""The objective registry is the one source of truth for `task:`: the config's allowed values, `adaptflow methods`
and the stages' dispatch follow it. Adding an objective from another package is proven in
tests/test_objective_plugin.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from adapters_impl import METHODS
from tasks.config import RunConfig
from tasks.objectives import OBJECTIVES, get_objective, objective_of_architectures, tasks_of


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
