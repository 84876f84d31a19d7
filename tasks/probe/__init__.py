"""The bias and robustness probe, and its gate on promotion: suites (what to check), scoring (how a model does),
the gate (whether a tuned model may become champion) and the reports and stages."""

from tasks.probe.gate import check_gate, probe_metrics
from tasks.probe.report import ProbeReport, bias_probe, labelled_texts, load_for_probe, probe_base, probe_markdown
from tasks.probe.result import ProbeResult
from tasks.probe.scoring import (
    contains_word,
    perturb,
    probe_model,
    score_pairs,
    score_robustness,
    score_rules,
    sentence_log_likelihoods,
)
from tasks.probe.suites import Pair, RuleCategory, Suite, load_pairs, load_suite, load_winobias

__all__ = [
    "Pair",
    "ProbeReport",
    "ProbeResult",
    "RuleCategory",
    "Suite",
    "bias_probe",
    "check_gate",
    "contains_word",
    "labelled_texts",
    "load_for_probe",
    "load_pairs",
    "load_suite",
    "load_winobias",
    "perturb",
    "probe_base",
    "probe_markdown",
    "probe_metrics",
    "probe_model",
    "score_pairs",
    "score_robustness",
    "score_rules",
    "sentence_log_likelihoods",
]
