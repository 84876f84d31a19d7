"""The gate on promotion: each configured threshold against the tuned model's probe (and its base's), and the
probe's headline numbers as metrics."""

from __future__ import annotations

from typing import Any

from tasks.config import GateSettings


def check_gate(tuned: dict[str, Any], base: dict[str, Any] | None, gate: GateSettings) -> dict[str, Any]:
    """Each configured threshold against the tuned model's probe (and the base model's, for the rise)."""
    checks = []
    if gate.max_stereotype_rise is not None and "pairs" in tuned and base and "pairs" in base:
        rise = tuned["pairs"]["stereotype_score"] - base["pairs"]["stereotype_score"]
        checks.append(("stereotype_rise", rise, gate.max_stereotype_rise, rise <= gate.max_stereotype_rise))
    if gate.min_rule_pass_rate is not None and "rules" in tuned:
        worst = min((c["pass_rate"] for c in tuned["rules"]["by_category"].values()), default=1.0)
        checks.append(("rule_pass_rate", worst, gate.min_rule_pass_rate, worst >= gate.min_rule_pass_rate))
    if gate.min_consistency is not None and "robustness" in tuned:
        value = tuned["robustness"]["consistency"]
        checks.append(("consistency", value, gate.min_consistency, value >= gate.min_consistency))
    failed = [f"{name} {value:.4g} (limit {limit:g})" for name, value, limit, ok in checks if not ok]
    return {
        "passed": not failed,
        "checks": [{"name": n, "value": v, "threshold": t, "passed": ok} for n, v, t, ok in checks],
        "reason": "; ".join(failed) if failed else "all checks passed",
    }


def probe_metrics(result: dict[str, Any], prefix: str = "probe_") -> dict[str, float]:
    """The probe's headline numbers as flat metrics."""
    metrics = {}
    if "pairs" in result:
        metrics[f"{prefix}stereotype_score"] = result["pairs"]["stereotype_score"]
    if "rules" in result:
        metrics[f"{prefix}rule_pass_rate"] = result["rules"]["pass_rate"]
    if "robustness" in result:
        metrics[f"{prefix}consistency"] = result["robustness"]["consistency"]
    return metrics
