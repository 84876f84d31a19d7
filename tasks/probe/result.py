"""A model's probe as a type: what scoring produces and the gate, the metrics and the reports read.

The JSON shape is the contract's (the run's `bias_probe` object, `adaptflow probe --json`, reports/probe.json):
a section the objective did not run (pairs, rules, robustness) is absent, not null.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer


class PairsSummary(BaseModel):
    """CrowS-Pairs' metric over some pairs (percent; NaN without pairs)."""

    stereotype_score: float
    pairs: int
    stereotypical: int
    ties: int


class DirectionScore(BaseModel):
    """The score of one direction's pairs with ties left out (None when all tied)."""

    score: float | None
    pairs: int
    stereotypical: int
    ties: int


class PairsResult(PairsSummary):
    by_direction: dict[str, DirectionScore]
    by_type: dict[str, PairsSummary]


class RuleFailure(BaseModel):
    prompt: str
    continuation: str
    forbidden_found: list[str]


class CategoryResult(BaseModel):
    language: str
    cases: int
    failures: list[RuleFailure]  # the first few
    pass_rate: float


class RulesResult(BaseModel):
    pass_rate: float
    cases: int
    by_category: dict[str, CategoryResult]


class PerturbationScore(BaseModel):
    accuracy: float
    consistency: float


class RobustnessResult(BaseModel):
    clean_accuracy: float
    consistency: float  # the lowest over the perturbations
    by_perturbation: dict[str, PerturbationScore]
    examples: int


class ProbeResult(BaseModel):
    """One model's probe on a suite: the sections its objective's checks produced."""

    suite: str | None
    pairs: PairsResult | None = None
    rules: RulesResult | None = None
    robustness: RobustnessResult | None = None

    @model_serializer(mode="wrap")
    def _present_sections(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        return {k: v for k, v in dumped.items() if k == "suite" or v is not None}
