"""The gate on promotion: each configured threshold against the tuned model's probe (and its base's), and the
probe's headline numbers as metrics."""

from __future__ import annotations

from typing import Any

from tasks.probe.result import ProbeResult
from tasks.settings import GateSettings


def check_gate(tuned: ProbeResult, base: ProbeResult | None, gate: GateSettings) -> dict[str, Any]:
    """Each configured threshold against the tuned model's probe (and the base model's, for the rise)."""
    checks = []
    if gate.max_stereotype_rise is not None and tuned.pairs and base and base.pairs:
        rise = tuned.pairs.stereotype_score - base.pairs.stereotype_score
        checks.append(("stereotype_rise", rise, gate.max_stereotype_rise, rise <= gate.max_stereotype_rise))
    if gate.min_rule_pass_rate is not None and tuned.rules:
        worst = min((c.pass_rate for c in tuned.rules.by_category.values()), default=1.0)
        checks.append(("rule_pass_rate", worst, gate.min_rule_pass_rate, worst >= gate.min_rule_pass_rate))
    if gate.min_consistency is not None and tuned.robustness:
        value = tuned.robustness.consistency
        checks.append(("consistency", value, gate.min_consistency, value >= gate.min_consistency))
    failed = [f"{name} {value:.4g} (limit {limit:g})" for name, value, limit, ok in checks if not ok]
    return {
        "passed": not failed,
        "checks": [{"name": n, "value": v, "threshold": t, "passed": ok} for n, v, t, ok in checks],
        "reason": "; ".join(failed) if failed else "all checks passed",
    }


def probe_metrics(result: ProbeResult | None, prefix: str = "probe_") -> dict[str, float]:
    """The probe's headline numbers as flat metrics (none without a probe)."""
    metrics = {}
    if result and result.pairs:
        metrics[f"{prefix}stereotype_score"] = result.pairs.stereotype_score
    if result and result.rules:
        metrics[f"{prefix}rule_pass_rate"] = result.rules.pass_rate
    if result and result.robustness:
        metrics[f"{prefix}consistency"] = result.robustness.consistency
    return metrics
