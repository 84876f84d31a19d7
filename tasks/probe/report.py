"""The probe's reports and stages: Markdown side by side, the pipeline's base/tuned probe stages, and the
standalone `adaptflow probe` stage (a model folder, hub id or `models:/` URI)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from adapters_impl.packaged import with_pad_token
from tasks.errors import UserInputError, capped
from tasks.objectives import Objective, get_objective, objective_of_architectures
from tasks.probe.gate import check_gate, probe_metrics
from tasks.probe.result import ProbeResult
from tasks.probe.suites import Suite, load_suite
from tasks.settings import GateSettings, ProbeSettings

log = logging.getLogger("adaptflow.probe")


def probe_markdown(tuned: ProbeResult, base: ProbeResult | None, gate: dict[str, Any] | None) -> str:
    """Base and tuned side by side, per category and bias type."""
    lines = [f"# Bias and robustness probe ({tuned.suite})", ""]

    def fmt(value: Any) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    if tuned.pairs:
        pairs, base_pairs = tuned.pairs, base.pairs if base else None
        lines += [
            "## Counterfactual pairs (stereotype score, %; 50 = no preference)",
            "",
            "| bias type | pairs | base | tuned |",
            "|---|---|---|---|",
        ]
        b = base_pairs.stereotype_score if base_pairs else None
        lines.append(f"| all | {pairs.pairs} | {fmt(b)} | {fmt(pairs.stereotype_score)} |")
        for direction, counts in pairs.by_direction.items():
            base_direction = base_pairs.by_direction.get(direction) if base_pairs else None
            b = base_direction.score if base_direction else None
            lines.append(f"| {direction} rows, ties left out | {counts.pairs} | {fmt(b)} | {fmt(counts.score)} |")
        for kind, summary in pairs.by_type.items():
            base_kind = base_pairs.by_type.get(kind) if base_pairs else None
            b = base_kind.stereotype_score if base_kind else None
            lines.append(f"| {kind} | {summary.pairs} | {fmt(b)} | {fmt(summary.stereotype_score)} |")
        lines.append("")
    if tuned.rules:
        lines += [
            "## Rule cases (pass rate)",
            "",
            "| category | language | cases | base | tuned |",
            "|---|---|---|---|---|",
        ]
        for name, category in tuned.rules.by_category.items():
            base_category = base.rules.by_category.get(name) if base and base.rules else None
            b = base_category.pass_rate if base_category else None
            lines.append(f"| {name} | {category.language} | {category.cases} | {fmt(b)} | {fmt(category.pass_rate)} |")
        lines.append("")
    if tuned.robustness:
        lines += ["## Robustness (classification)", "", "| perturbation | accuracy | consistency |", "|---|---|---|"]
        for kind, values in tuned.robustness.by_perturbation.items():
            lines.append(f"| {kind} | {fmt(values.accuracy)} | {fmt(values.consistency)} |")
        lines.append("")
    if gate:
        lines += [f"## Gate: {'passed' if gate['passed'] else 'FAILED'} — {gate['reason']}", ""]
        lines += [
            f"- {c['name']}: {fmt(c['value'])} (limit {c['threshold']}) {'ok' if c['passed'] else 'failed'}"
            for c in gate["checks"]
        ]
    return "\n".join(lines) + "\n"


class ProbeReport(BaseModel):
    """The probe of the tuned model, its base model's (when the check compares), and the gate's verdict."""

    tuned: ProbeResult | None  # None: no probe configured
    base: ProbeResult | None
    gate: dict[str, Any]

    def public(self) -> dict[str, Any]:
        """The `bias_probe` object of the run's JSON: the tuned model's sections, the base's, the gate."""
        tuned = self.tuned.model_dump() if self.tuned else {}
        return {**tuned, "base": self.base.model_dump() if self.base else None, "gate": self.gate}


def probe_base(
    source: Any, task: str, settings: ProbeSettings, options: dict[str, Any] | None = None
) -> ProbeResult | None:
    """The untouched base model's probe, where it means something (causal LM: an untrained classifier head does not),
    its prompts in the run's form (`options`: the objective's encoding options, an instruction run's template)."""
    from tasks.modeling import load_base_model, load_tokenizer

    objective = get_objective(task)
    if settings.suite is None or not objective.probes_base:
        return None
    tokenizer = load_tokenizer(source)
    model = load_base_model(source, objective.head, tokenizer)
    return probe_model(model, tokenizer, objective, load_suite(settings.suite), settings, options=options)


def bias_probe(
    trained: Any, data: Any, tokenized: Any, settings: ProbeSettings, base: ProbeResult | None, run: Any
) -> ProbeReport:
    """Probe the tuned model, gate it against the base model's probe, write the reports and metrics."""
    from tasks.adapting import load_adapted, remember
    from tasks.modeling import load_tokenizer
    from tasks.tracking import log_metrics

    if settings.suite is None:
        return ProbeReport(tuned=None, base=None, gate={"passed": True, "checks": [], "reason": "no probe configured"})
    adapted = trained.adapted
    model = load_adapted(adapted, trained.adapter_dir)
    tokenizer = load_tokenizer(adapted.source)
    objective = get_objective(adapted.task)
    texts, labels = objective.probe_inputs(data, tokenized)
    suite = load_suite(settings.suite)
    tuned = probe_model(model, tokenizer, objective, suite, settings, texts, labels, tokenized.options)
    remember(trained.adapter_dir, model)  # merge comes next
    gate = check_gate(tuned, base, settings.gate)
    reports = Path(run.run_dir) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    report = ProbeReport(tuned=tuned, base=base, gate=gate)
    (reports / "probe.json").write_text(report.model_dump_json(indent=2))
    (reports / "probe.md").write_text(probe_markdown(tuned, base, gate))
    log_metrics(run, {**probe_metrics(tuned), **probe_metrics(base, "base_probe_")})
    return report


def load_for_probe(model: str, trust_remote_code: bool = False) -> tuple[nn.Module, Any, str, dict[str, Any]]:
    """(model, tokenizer, task, serving options: a registered instruction model's template) from a `models:/` URI,
    a local folder, a GGUF file, a builtin model or a hub id.

    Raises:
        UserInputError: MODEL cannot be loaded.
    """
    if model.startswith(("models:/", "runs:/")):
        from adapters_impl.packaged import download_registered

        try:
            served = download_registered(model)
        except Exception as exc:
            raise UserInputError(f"MODEL: cannot load {model!r}: {str(exc).splitlines()[0][:300]}") from None
        return served.model, served.tokenizer, served.task, served.serving
    from transformers import AutoConfig, AutoTokenizer

    from tasks.modeling import local_model_folder, pickle_only

    folder = local_model_folder(model, "MODEL")  # a builtin name or a GGUF file: its converted folder
    model = str(folder) if folder is not None else model
    pickles = pickle_only(Path(model)) if Path(model).is_dir() else []
    if pickles:
        raise UserInputError(
            f"MODEL: {model} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors"
        )
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        objective = objective_of_architectures(config.architectures or [])
        loaded = objective.head.auto_class().from_pretrained(
            model, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"MODEL: {model!r} is not a loadable model ({str(exc).splitlines()[0][:200]})") from None
    return loaded, with_pad_token(tokenizer), objective.name, {}


def labelled_texts(path: Path, model: nn.Module, text_column: str, label_column: str) -> tuple[list[str], list[int]]:
    """Texts and label ids (by the model's label names) for the robustness check."""
    from tasks.load import read_table

    table, _ = read_table(str(path), "--data")
    missing = {text_column, label_column} - set(table.column_names)
    if missing:
        raise UserInputError(f"--data: {path} lacks column(s) {sorted(missing)}")
    label2id = {str(k): int(v) for k, v in model.config.label2id.items()}  # type: ignore[union-attr,operator]
    unknown = sorted({str(v) for v in table[label_column]} - set(label2id))
    if unknown:
        raise UserInputError(f"--data: labels {capped(unknown)} are not among the model's: {capped(sorted(label2id))}")
    return [str(t) for t in table[text_column]], [label2id[str(v)] for v in table[label_column]]


def probe_standalone(
    model: str,
    suite_name: str,
    settings: ProbeSettings,
    data: Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> tuple[dict[str, Any], str]:
    """`adaptflow probe`: one model (folder, hub id or `models:/` URI) on a suite, no gate on a rise (there is no
    base to compare with). Returns the result object and its Markdown report.

    Raises:
        UserInputError: the model, the suite or the labelled data cannot be loaded.
    """
    suite = load_suite(suite_name, "--suite")
    loaded, tokenizer, task, options = load_for_probe(model)
    texts = labels = None
    if data is not None:
        texts, labels = labelled_texts(data, loaded, text_column, label_column)
    probed = probe_model(loaded, tokenizer, get_objective(task), suite, settings, texts, labels, options)
    gate = check_gate(probed, None, GateSettings(max_stereotype_rise=None))
    result = {"command": "probe", "model": model, "task": task, **probed.model_dump(), "gate": gate}
    return result, probe_markdown(probed, None, gate)


def probe_model(
    model: nn.Module,
    tokenizer: Any,
    objective: Objective,
    suite: Suite,
    settings: ProbeSettings,
    eval_texts: list[str] | None = None,
    eval_labels: list[int] | None = None,
    options: Mapping[str, Any] | None = None,
) -> ProbeResult:
    """Every check of the suite that applies to the objective's models (generation checks need a causal LM).
    `options`: the objective's encoding options (an instruction model's chat template)."""
    sections = objective.probe(model, tokenizer, suite, settings, eval_texts, eval_labels, options or {})
    return ProbeResult.model_validate({"suite": suite.name, **sections})
