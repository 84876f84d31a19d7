"""Export a registered version in a serving format, verified against the model it came from.

One module per format (`hf_merged`, `gguf_model`, `gguf_lora`, `ollama` (both Ollama forms), `vllm`) and `verify` for the checks;
`export_package` writes one format into a temporary folder beside `--out`, verifies it, records the verdict in
`verification.json` and only then moves the folder into place: nothing half-written is ever at `--out`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.errors import RunFailed, UserInputError
from tasks.export.source import ExportSource, load_source

FORMATS = ("hf-merged", "gguf", "gguf-lora", "ollama", "ollama-lora", "vllm-check")
QUANTS = ("f32", "f16", "bf16", "q8_0")
VERIFICATION_FILE = "verification.json"


class ExportRecord(BaseModel):
    """One written artifact and its verification (the contract's `exports[]` item)."""

    format: str
    quant: str | None
    path: str
    files: list[str]
    bytes: int
    seconds: float
    verified: bool
    checks: dict[str, Any]
    failed: list[str] = []
    notes: list[str] = []


class ExportFailed(RunFailed):
    """An artifact was written but failed its verification (exit 1); `result` is the JSON the CLI prints."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


# A format's writer: (source, staging folder, quant) -> (checks, notes). Checks that are False, or whose "passed"
# is False, fail the verification.
Writer = Callable[[ExportSource, Path, str | None], tuple[dict[str, Any], list[str]]]


def _writer(fmt: str) -> Writer:
    if fmt == "hf-merged":
        from tasks.export.hf_merged import write_hf_merged

        return write_hf_merged
    if fmt == "gguf":
        from tasks.export.gguf_model import write_gguf

        return write_gguf
    if fmt == "gguf-lora":
        from tasks.export.gguf_lora import write_gguf_lora

        return write_gguf_lora
    if fmt == "ollama":
        from tasks.export.ollama import write_ollama

        return write_ollama
    if fmt == "ollama-lora":
        from tasks.export.ollama import write_ollama_lora

        return write_ollama_lora
    from tasks.export.vllm import write_vllm_check

    return write_vllm_check


def check_format(fmt: str, quant: str | None) -> None:
    """Raises UserInputError for an unknown format, or a quantization the format cannot write."""
    if fmt not in FORMATS:
        raise UserInputError(f"--format: unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if quant is not None and quant not in QUANTS:
        raise UserInputError(f"--quant: unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    if fmt == "hf-merged" and quant == "q8_0":
        raise UserInputError("--quant: hf-merged writes safetensors in f32, f16 or bf16; q8_0 is for --format gguf")


def check_out(out: Path, force: bool) -> None:
    """Raises UserInputError when `--out` is a non-empty folder (or a file) and not `force`."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out: {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserInputError(
            f"--out: {out} exists and is not empty; choose another folder or add --force to replace it"
        )


def failed_checks(checks: dict[str, Any]) -> list[str]:
    """The names of the checks that did not pass (a False value, or a dict whose `passed` is False)."""
    failed = []
    for name, value in checks.items():
        if value is False or (isinstance(value, dict) and value.get("passed") is False):
            failed.append(name)
    return failed


def _publish(staging: Path, out: Path) -> None:
    """Move a finished staging folder to `out`, replacing what was there (checked by `check_out`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    trash = None
    if out.exists():
        trash = out.with_name(f".{out.name}.replaced-{time.time_ns()}")
        out.rename(trash)
    staging.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def export_source(source: ExportSource, fmt: str, quant: str | None, out: Path, force: bool) -> ExportRecord:
    """Write, verify and publish one format of `source` at `out`. The verdict is in `out/verification.json`
    whether it passed or not; the caller decides what a failed one means (the CLI exits 1).

    Raises:
        UserInputError: bad format, quantization or `--out`, or a model the format cannot carry (named, with
            what works instead); nothing is written then.
    """
    check_format(fmt, quant)
    out = out.expanduser().resolve()
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        started = time.monotonic()
        checks, notes = _writer(fmt)(source, staging, quant)
        seconds = time.monotonic() - started
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        size = sum((staging / f).stat().st_size for f in files)
        failed = failed_checks(checks)
        record = ExportRecord(
            format=fmt,
            quant=checks.pop("quant", quant),
            path=str(out),
            files=files,
            bytes=size,
            seconds=round(seconds, 3),
            verified=not failed,
            checks=checks,
            failed=failed,
            notes=notes,
        )
        verification = {"model_uri": source.uri, **record.model_dump(exclude={"path"})}
        (staging / VERIFICATION_FILE).write_text(json.dumps(verification, indent=2, default=str) + "\n")
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def export_model(
    uri: str, formats: list[str], quant: str | None, out: Path, force: bool, source: ExportSource | None = None
) -> list[ExportRecord]:
    """Export a `models:/` version (already loaded as `source`, or downloaded here) in each format; with more than
    one format each goes to its own subfolder of `out`."""
    for fmt in formats:
        check_format(fmt, quant)
    check_out(out.expanduser().resolve(), force)
    source = source or load_source(uri)
    if len(formats) == 1:
        return [export_source(source, formats[0], quant, out, force)]
    return [export_source(source, fmt, quant, out / fmt, True) for fmt in formats]


def result_of(uri: str, records: list[ExportRecord]) -> dict[str, Any]:
    """The `export` JSON object."""
    return {
        "command": "export",
        "status": "ok" if all(r.verified for r in records) else "failed",
        "model_uri": uri,
        "exports": [r.model_dump() for r in records],
    }


def raise_if_unverified(uri: str, records: list[ExportRecord]) -> None:
    """Raises ExportFailed naming each artifact and check that failed verification."""
    bad = [r for r in records if not r.verified]
    if bad:
        said = "; ".join(f"{r.format} at {r.path}: {', '.join(r.failed)}" for r in bad)
        raise ExportFailed(
            f"verification failed ({said}); see {VERIFICATION_FILE} in each folder", result_of(uri, records)
        )
