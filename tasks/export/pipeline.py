"""The pipeline's export stage: the `export:` section run on a registered version, its verdict on the version.

Tags on the version: `export.status` (verified / failed), per format `export.<format>.verified`, `.path`, `.bytes`
and the numbers its checks measured (`export.gguf.max_abs_logit_diff`, ...). With `export.gate`, a version whose
export failed verification (or could not be written) is kept out of @champion, as a failed bias gate keeps it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from tasks.config import ExportSettings
from tasks.errors import UserInputError
from tasks.export import ExportRecord, export_model
from tasks.registry import PENDING, RegisteredRef

log = logging.getLogger("adaptflow")
# Check results logged as version tags (numbers a user compares across versions).
TAGGED_CHECKS = ("max_abs_logit_diff", "logit_tolerance", "greedy_match", "same_token_ids", "max_abs_weight_diff",
                 "template_renders_same")  # fmt: skip


class ExportVerdict(BaseModel):
    """What the export stage wrote and whether the version may be promoted on its account."""

    path: str
    passed: bool
    reason: str
    gate: bool
    exports: list[dict[str, Any]] = []

    @property
    def holds_back(self) -> bool:
        return self.gate and not self.passed

    def public(self) -> dict[str, Any]:
        """The `export` object of the run and grid JSON: the verdict and each artifact as `adaptflow export --json`
        lists it."""
        status = "verified" if self.passed else "failed"
        return {"status": status, "path": self.path, "reason": self.reason, "gate": self.gate, "exports": self.exports}


def version_tags(records: list[ExportRecord]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for record in records:
        prefix = f"export.{record.format}"
        tags |= {f"{prefix}.verified": str(record.verified).lower(), f"{prefix}.path": record.path}
        tags |= {f"{prefix}.bytes": str(record.bytes), f"{prefix}.quant": str(record.quant)}
        for key in TAGGED_CHECKS:
            value = record.checks.get(key)
            if value is not None:
                tags[f"{prefix}.{key}"] = f"{value:.6g}" if isinstance(value, float) else str(value).lower()
        if record.failed:
            tags[f"{prefix}.failed"] = ", ".join(record.failed)
    return tags


def export_registered(
    settings: ExportSettings | None, registered: RegisteredRef, client: MlflowClient, output_dir: str
) -> ExportVerdict | None:
    """Run the configured export on a registered version and tag the version with the verdict (None: no export)."""
    if settings is None:
        return None
    root = Path(settings.path).expanduser() if settings.path else Path(output_dir) / "exports"
    out = (root / f"{registered.name}-v{registered.version}").resolve()
    try:
        records = export_model(registered.model_uri, list(settings.formats), settings.quant, out, force=True)
        failed = [f"{r.format}: {', '.join(r.failed)}" for r in records if not r.verified]
        reason = f"export verification failed ({'; '.join(failed)})" if failed else "exports verified"
        verdict = ExportVerdict(path=str(out), passed=not failed, reason=reason, gate=settings.gate,
                                exports=[r.model_dump() for r in records])  # fmt: skip
        tags = version_tags(records)
    except UserInputError as exc:  # a format this version cannot take: recorded, never a failed run
        verdict = ExportVerdict(path=str(out), passed=False, reason=f"export failed: {exc}", gate=settings.gate)
        tags = {"export.error": str(exc)[:5000]}
    tags["export.status"] = "verified" if verdict.passed else "failed"
    for key, value in tags.items():
        client.set_model_version_tag(registered.name, registered.version, key, value[:5000])
    if settings.store and verdict.exports:
        client.log_artifacts(registered.run_id, str(out), "exports")
    if not verdict.passed:
        log.warning("%s version %s: %s", registered.name, registered.version, verdict.reason)
    return verdict


def hold_back(client: MlflowClient, registered: RegisteredRef, verdict: ExportVerdict) -> dict[str, Any]:
    """Keep a version out of @champion because its export failed verification: the reason on the version, no
    alias; what promotion's Decision holds."""
    name, version = registered.name, registered.version
    reason = f"{verdict.reason} (export.gate)"
    client.set_model_version_tag(name, version, "promotion", reason[:5000])
    with contextlib.suppress(MlflowException):
        client.delete_model_version_tag(name, version, PENDING)
    champion = ""
    with contextlib.suppress(MlflowException):
        champion = str(client.get_model_version_by_alias(name, "champion").version)
    return {"name": name, "version": version, "alias": "", "promoted": False, "champion_version": champion,
            "reason": reason}  # fmt: skip
