"""The one record every objective fills in: what differs between kinds of learning problem (config `task:`).

"Task" already names the pipeline stages (tasks/) and Prefect's @task, so the kind of learning problem is an
objective. The floors: the shared settings (tasks/settings.py) and the measuring (tasks/measuring.py,
generation.py, modeling.py, load.py, probe/scoring.py) below the objectives; the run config (tasks/config.py) and
the stages above them, resolving `task:` once (`RunConfig.objective`) and calling the record, never branching on
its name. An objective imports nothing above it. Which methods can train it stays with the methods
(`Method.unsupported`, keyed by the kind of model head: adapters_impl sits below this layer).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from adapters_impl.model_heads import ModelHead
from tasks.labels import IGNORE_INDEX
from tasks.settings import RowLayout, Section

if TYPE_CHECKING:  # the stages and the run config import this package: at run time these would be import cycles
    from datasets import Dataset
    from torch import nn

    from adapters_impl import Method
    from tasks.config import RunConfig
    from tasks.load import DataRef, PreparedRows
    from tasks.modeling import ModelSource
    from tasks.probe.suites import Suite
    from tasks.settings import DataSettings, ProbeSettings
    from tasks.tokenization import TokenizedRef

__all__ = [
    "IGNORE_INDEX",
    "Encode",
    "Encoding",
    "GridDimension",
    "Objective",
    "OwnTraining",
    "ReportInput",
    "TrainingShape",
    "text_rows",
]

Encode = Callable[[dict[str, list[Any]]], dict[str, list[Any]]]


class Encoding(BaseModel):
    """What an objective's encoder resolved that every stage reads (the token ids aside); the encoder fills it."""

    metrics: dict[str, float] = {}  # logged with the run (e.g. rows dropped as too long)
    params: dict[str, str] = {}  # run params (e.g. the resolved template)
    package: dict[str, Any] = {}  # what a registered model's package records for serving (e.g. its chat template)
    # Tokens the encoder added to the tokenizer: every later load adds them again and trains their rows
    # (`TokenizedRef.model_source`).
    added_tokens: list[str] = []


@dataclass(frozen=True)
class ReportInput:
    """What an objective's evaluation report may use: the tuned model and the run's data and metrics."""

    model: nn.Module
    tokenizer: Any
    data: DataRef
    tokenized: TokenizedRef
    metrics: dict[str, float]
    base_texts: list[str]
    label_names: list[str] | None
    folder: Path
    batch_size: int


@dataclass(frozen=True)
class OwnTraining:
    """An objective's own training loss (`Objective.training`), for the Trainer the train stage builds: `mixin` is
    put before the stage's Trainer class (it overrides `compute_loss` and whatever else it needs) and `kwargs` are
    its constructor's; `collator` pads the rows that loss reads, in place of `Objective.collator`."""

    mixin: type
    kwargs: Mapping[str, Any]
    collator: Callable[[list[dict[str, Any]]], Any]


def text_rows(table: Dataset, settings: DataSettings, label_column: str | None, key: str, source: str) -> Dataset:
    """The text and label columns, rows without either dropped (tasks/load.py's; datasets loads when this runs, not
    when the objectives are read to check a config)."""
    from tasks.load import text_rows as rows

    return rows(table, settings, label_column, key, source)


@dataclass(frozen=True)
class TrainingShape:
    """What training holds per batch row beyond one sequence through the trained model, for the memory plan
    (tasks/memory.py): `sequences` each row puts through the model with gradients (a preference pair: chosen and
    rejected), and whether a `frozen_copy` of the model training starts from is held beside it (a reference
    model for a method without an adapter to switch off)."""

    sequences: int = 1
    frozen_copy: bool = False


def one_sequence(config: RunConfig, model: nn.Module) -> TrainingShape:
    return TrainingShape()


@dataclass(frozen=True)
class GridDimension:
    """A key of the objective's own section that a grid may list (`grid.<name>: [...]`), one trial per value,
    beside r / alpha / target modules: `item` the type of one value (a pydantic annotation), `label` how a value
    reads in trial names. Only settings that leave the encoded rows as they are: a grid tokenizes once and each
    trial overlays its own section on the tokenized options (`Objective.options`)."""

    name: str
    item: Any
    description: str

    def label(self, value: Any) -> str:
        return f"{self.name}={value:g}" if isinstance(value, float) else f"{self.name}={value}"


def no_base_generations(source: ModelSource, data: DataRef, tokenized: TokenizedRef) -> list[str]:
    return []


def no_options(config: RunConfig) -> dict[str, Any]:
    return {}


def no_data_key(settings: DataSettings) -> str:
    return ""


def row_layout_key(settings: DataSettings) -> str:
    """The data key of an objective that reads structured rows: the `RowLayout` keys (format, columns, role_map)
    that change how rows are read."""
    return json.dumps(settings.layout(), sort_keys=True)


def no_files(config: RunConfig) -> dict[str, str]:
    return {}


def no_problems(config: RunConfig) -> list[str]:
    return []


def loss_only(config: RunConfig) -> tuple[str, ...]:
    return ("eval_loss",)


def no_hint(metric: str, key: str) -> str:
    return ""


def always_comparable(tokenized: TokenizedRef, served_label_names: list[str] | None) -> str | None:
    return None


def no_probe_inputs(data: DataRef, tokenized: TokenizedRef) -> tuple[list[str] | None, list[int] | None]:
    return None, None


@dataclass(frozen=True)
class Objective:
    """A kind of learning problem: how its rows become training examples, its model head, metrics and reports.

    Data: `uses_labels` says whether `data.label_column` is read, checked and kept (and stratifies the split);
    `prepare_rows(table, data_settings, label_column, key, source)` checks a split's columns and keeps the usable
    rows, normalised (default: the text and label columns, rows without either dropped), in column `row_column`
    when it names one (else `data.text_column`), returning them or `PreparedRows` with counts the run logs;
    `data_key(data_settings)` the data settings that change those rows (part of the data's fingerprint).
    Encoding: `options(config)` picks the objective's settings from the run config (part of the tokenization cache
    key); `encoder(tokenizer, data, train, eval, max_length, options, encoding)` returns the batched row encoder
    (ids and labels) and the label names, if any, and fills `encoding` (an `Encoding`: metrics, params, package,
    added tokens) with what every stage reads. It gets a copy of `options` and may add to it what its own later
    stages need (e.g. the resolved chat template); TokenizedRef.options carries that copy. Rows with fewer than
    `min_tokens` tokens are dropped; `collator(tokenizer)` pads a batch.
    Settings: `section` names its own config section (`instruction:`) and `settings` its model (`None`: none);
    `row_layout` the model that checks the `data:` keys of structured rows it reads (format, columns, role_map;
    `None`: it reads none and they are refused); `packing_problem` why `train.packing` cannot apply (None: it can).
    Model: `head` the kind of model it trains (transformers auto class, the new head's arguments, recorded in the
    registered package so that serving loads the same class).
    Metrics: `metrics(model, tokenizer, tokenized, batch_size, keep)` the eval metrics on the eval split (with
    `keep`, the run's reports folder, it may keep there what it generated, for `report` to reuse); `eval_loss` the
    one loss that compares across models; `base_metrics(source, tokenized, batch_size)` the baseline (prefixed `base_`);
    `check_comparable(tokenized, served_label_names)` says why a registered model's scores would not compare.
    `metric_names(config)` names what `metrics` will report for this config and `report_metrics` what `report` adds:
    known before training, so that a promotion or grid metric no run reports is refused at once;
    `metric_hint(metric, key)` what to set for a metric it could report but this config does not (`key`: the
    config key that asks for it).
    Checks: `check(config)` what is wrong with the files its settings name and with the data they will read (each
    problem naming its key), before any run opens.
    Memory: `shape(config, model)` what its training holds per row (`TrainingShape`), given the adapted model (on the
    meta device).
    Grid: `grid_dimensions` the keys of its section a grid may list beside r / alpha / target modules
    (`GridDimension`); `grid.<name>` is refused for the other tasks.
    Identity: `files(config)` the files its settings name, config key -> content fingerprint: part of the
    tokenization cache key, of a version's identity and of what `--resume` checks (a file edited in place counts).
    Reports: `base_generations(source, data, tokenized)` the base model's part of the report (cached per base model),
    `report(ReportInput)` the objective's sections of eval_report.json and its extra metrics.
    Probe: `probe(model, tokenizer, suite, settings, texts, labels)` the suite's checks that apply;
    `probes_base` whether the untouched base's probe means anything; `probe_inputs(data, tokenized)` the eval
    texts and label ids some checks need.
    Training: `token_loss` whether the model's loss divides by the Trainer's count of label tokens over the whole
    global batch (`num_items_in_batch`, as transformers' causal LMs do); False: a mean over each batch's rows, which
    the Trainer must neither pass that count to nor scale up by the world size and gradient accumulation.
    `training(options, model, tokenizer, starting)`: a loss of its own (None: the model's), given the tokenized
    options, the model about to train, its tokenizer and a loader of the model as training starts from it (a frozen
    reference, say); see `OwnTraining`.
    What a registered model's predict accepts and returns is in tasks/pyfunc_model.py: it runs where only
    adapters_impl is installed.
    """

    name: str
    summary: str
    encoder: Callable[[Any, DataRef, Dataset, Dataset, int, dict[str, Any], Encoding], tuple[Encode, list[str] | None]]
    collator: Callable[[Any], Any]
    head: ModelHead
    metrics: Callable[[nn.Module, Any, TokenizedRef, int, Path | None], dict[str, float]]
    eval_loss: Callable[[nn.Module, Dataset, Any, int], float]
    base_metrics: Callable[[ModelSource, TokenizedRef, int], dict[str, float]]
    report: Callable[[ReportInput], tuple[dict[str, Any], dict[str, float]]]
    probe: Callable[
        [nn.Module, Any, Suite, ProbeSettings, list[str] | None, list[int] | None, Mapping[str, Any]], dict[str, Any]
    ]
    uses_labels: bool = False
    prepare_rows: Callable[[Dataset, DataSettings, str | None, str, str], Dataset | PreparedRows] = text_rows
    min_tokens: int = 1
    check_comparable: Callable[[TokenizedRef, list[str] | None], str | None] = always_comparable
    base_generations: Callable[[ModelSource, DataRef, TokenizedRef], list[str]] = no_base_generations
    options: Callable[[RunConfig], dict[str, Any]] = no_options
    row_column: str | None = None
    data_key: Callable[[DataSettings], str] = no_data_key
    probes_base: bool = False
    probe_inputs: Callable[[DataRef, TokenizedRef], tuple[list[str] | None, list[int] | None]] = no_probe_inputs
    section: str | None = None
    settings: type[Section] | None = None
    row_layout: type[RowLayout] | None = None
    packing_problem: str | None = None
    metric_hint: Callable[[str, str], str] = no_hint
    token_loss: bool = True
    metric_names: Callable[[RunConfig], tuple[str, ...]] = loss_only
    report_metrics: tuple[str, ...] = ()
    files: Callable[[RunConfig], dict[str, str]] = no_files
    check: Callable[[RunConfig], list[str]] = no_problems
    training: Callable[[Mapping[str, Any], nn.Module, Any, Callable[[], nn.Module]], OwnTraining] | None = None
    grid_dimensions: tuple[GridDimension, ...] = ()
    shape: Callable[[RunConfig, nn.Module], TrainingShape] = one_sequence

    def supports(self, method: Method) -> bool:
        return self.head.kind not in method.unsupported
