"""Objectives (the kind of learning problem, config `task:`), registered by name.

A new objective = one module or package here + one line in OBJECTIVES (and its rows in the test matrix,
tests/test_methods.py); or, from another package, its module + one entry point line (`installed_objectives`). An objective imports nothing above it: the run config and the stages import this registry.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from adapters_impl import Method
from tasks.objectives import causal_lm, classification
from tasks.objectives.base import IGNORE_INDEX, Objective, ReportInput
from tasks.objectives.instruction import objective as instruction
from tasks.objectives.preference import objective as preference

PLUGIN_GROUP = "adaptflow.objectives"


def installed_objectives() -> tuple[Objective, ...]:
    """Objectives other installed packages add, each by one line of their packaging metadata:
    `[project.entry-points."adaptflow.objectives"] NAME = "module:OBJECTIVE"`."""
    return tuple(entry.load() for entry in entry_points(group=PLUGIN_GROUP))


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        causal_lm.OBJECTIVE,
        classification.OBJECTIVE,
        instruction.OBJECTIVE,
        preference.OBJECTIVE,
        *installed_objectives(),
    )
}


def get_objective(name: str) -> Objective:
    """The registered objective called `name` (config validation has already checked it exists)."""
    return OBJECTIVES[name]


def tasks_of(method: Method) -> tuple[str, ...]:
    """The names of the objectives `method` can train (config `task:` values), in registry order."""
    return tuple(name for name, objective in OBJECTIVES.items() if objective.supports(method))


def objective_of_architectures(architectures: list[str]) -> Objective:
    """The objective of a plain model folder, by its class names (`LlamaForSequenceClassification`); the first
    registered objective (causal_lm) when none matches."""
    for objective in OBJECTIVES.values():
        if any(a.endswith(objective.head.architecture) for a in architectures):
            return objective
    return next(iter(OBJECTIVES.values()))


__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "Objective",
    "ReportInput",
    "get_objective",
    "objective_of_architectures",
    "tasks_of",
]
