"""Task preference: DPO, IPO, hinge, SimPO, ORPO and KTO on chat pairs (or labelled rows), as one objective.

Rows are normalised when loaded (formats.py), rendered with the run's chat template and encoded with labels on the
responses when tokenized (encode.py), trained with the preference loss through the Trainer hook
`Objective.training` (train.py's `PreferenceTrainerMixin`) and evaluated on held-out pairs: the preference loss,
reward accuracy and margin, log-probs, and the share of pairs whose chosen response the model finds likelier than
the rejected one (`eval_pair_accuracy`, beside the untouched base's `base_eval_pair_accuracy`). Served as a chat
model, like instruction (the package records the template).

The reference model: the policy with its adapter disabled (peft methods; no second copy in memory), else a frozen
copy of the model training starts from (full, the bottleneck adapter), in evaluation the untouched base.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

import tasks.objectives.causal_lm as causal_lm
from adapters_impl.model_heads import CAUSAL_LM
from tasks.objectives.base import (
    Encode,
    Encoding,
    GridDimension,
    Objective,
    OwnTraining,
    ReportInput,
    TrainingShape,
    row_layout_key,
)
from tasks.objectives.instruction import objective as instruction
from tasks.objectives.preference.settings import (
    LossName,
    PreferenceDataSettings,
    PreferenceSection,
    loss_settings,
    section,
)

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from torch import nn

    from tasks.config import RunConfig
    from tasks.load import DataRef, PreparedRows
    from tasks.modeling import ModelSource
    from tasks.objectives.preference.train import PreferenceLoss, Reference
    from tasks.settings import DataSettings
    from tasks.tokenization import TokenizedRef

log = logging.getLogger("adaptflow.preference")

REPORTED = 8  # flipped pairs shown in the report
IDENTICAL = "pref_dropped_identical"  # the metric of pairs dropped because chosen equals rejected
PLOT = "reward_margins.png"


def options(config: RunConfig) -> dict[str, Any]:
    """The `preference:` section (the loss's aliases: `lambda`), the template file's fingerprint, and the model
    settings (evaluation's reference for a model without an adapter to disable is the untouched base)."""
    settings = section(config).model_dump(mode="json", by_alias=True)
    digest = files(config).get("preference.template")
    return settings | ({"template_sha256": digest} if digest else {}) | {"model": config.model.model_dump(mode="json")}


def files(config: RunConfig) -> dict[str, str]:
    """`preference.template`'s content fingerprint when it names a file."""
    return section(config).template_file("preference.template")


def losses(config: RunConfig) -> list[tuple[str, str]]:
    """(config key, loss) for every loss this config trains: `preference.loss`, or each of `grid.loss`."""
    listed = config.grid.objective_values().get("loss") if config.grid else None
    return [("grid.loss", str(loss)) for loss in listed] if listed else [("preference.loss", section(config).loss)]


def check(config: RunConfig) -> list[str]:
    """A missing template file; KTO with one row per batch (its reference point comes from the batch's other rows);
    a loss that does not take the data's rows (pairs, or labelled rows for kto: detected from the data files'
    first rows, before any run opens), and a grid over losses of both kinds."""
    from tasks.errors import UserInputError
    from tasks.load import peek_columns
    from tasks.objectives.preference.formats import PAIR_LOSSES, DataOptions, detect_format, loss_format_problem

    settings = section(config)
    problems = settings.template_problems("preference.template")
    trained = losses(config)
    if any(loss == "kto" for _, loss in trained) and config.train.batch_size < 2:
        problems.append(
            "train.batch_size: loss kto estimates its reference point from each row's prompt with another row's "
            f"completion in the same batch; it needs train.batch_size of 2 or more (got {config.train.batch_size})"
        )
    kinds = {loss == "kto" for _, loss in trained}
    if len(kinds) > 1:
        problems.append(
            f"grid.loss: kto takes unpaired labelled rows and the pair losses ({', '.join(PAIR_LOSSES)}) take "
            "pairs; one grid trains on one data set: list losses of one kind"
        )
        return problems
    options = DataOptions.of(config.data)
    for key, value in (("data.train", config.data.train), ("data.eval", config.data.eval)):
        columns = peek_columns(value) if value else None
        if not columns:
            continue
        try:
            fmt = detect_format(columns, options, f"{key} ({value})")
        except UserInputError as exc:
            problems.append(str(exc))
            break
        problem = next((p for k, loss in trained if (p := loss_format_problem(loss, fmt, key, k))), None)
        if problem:
            problems.append(problem)
            break
    return problems


def metric_names(config: RunConfig) -> tuple[str, ...]:
    from tasks.objectives.preference.train import metric_names as names

    return names(section(config).loss)


def prepare_rows(
    table: Dataset, settings: DataSettings, label_column: str | None, key: str, value: str
) -> PreparedRows:
    """Every row in the normal form (prompt, chosen, rejected messages; or prompt, completion, label); errors name
    the file, the row and the formats. Pairs whose chosen equals rejected are dropped, with a warning, and counted
    (run metric `pref_dropped_identical`)."""
    from datasets import Dataset

    from tasks.load import PreparedRows
    from tasks.objectives.preference.formats import DataOptions, normalize

    normalized = normalize(table.to_list(), DataOptions.of(settings), f"{key} ({value})")
    if normalized.equal_dropped:
        log.warning("%s: %d pair(s) whose chosen equals rejected dropped", key, normalized.equal_dropped)
    log.info("%s: %d %s preference rows", key, len(normalized.rows), normalized.format)
    return PreparedRows(Dataset.from_list(normalized.rows), {IDENTICAL: float(normalized.equal_dropped)})


def encoder(
    tokenizer: Any,
    data: DataRef,
    train: Dataset,
    eval_: Dataset,
    max_length: int,
    settings: dict[str, Any],
    encoding: Encoding,
) -> tuple[Encode, None]:
    """Pairs (or labelled rows) rendered with the template, labels on the responses; rows whose response cannot fit
    are dropped and counted (`pref_dropped_rows`). Records the template for the later stages and the package.

    Raises:
        UserInputError: the loss takes the other kind of rows (kto: unpaired; the others: pairs).
    """
    from tasks.errors import UserInputError
    from tasks.objectives.preference.encode import PreferenceEncoder
    from tasks.objectives.preference.formats import loss_format_problem

    paired = "chosen" in train.column_names
    loss = str(settings.get("loss", "sigmoid"))
    problem = loss_format_problem(loss, "explicit" if paired else "unpaired")
    if problem:
        raise UserInputError(problem)
    template = instruction.use_template(tokenizer, settings, encoding, "pref.template")
    settings |= {"max_length": max_length, "paired": paired}
    # Rows dropped as too long (`pref_dropped_rows`), beside the pairs loading dropped as identical.
    counts = encoding.metrics = {"pref_dropped_rows": 0, IDENTICAL: data.metrics.get(IDENTICAL, 0.0)}
    encode_rows = PreferenceEncoder(tokenizer, template, max_length, paired)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        before = encode_rows.dropped
        out = encode_rows(batch)
        counts["pref_dropped_rows"] += encode_rows.dropped - before
        if paired:  # what the stages count as a row's tokens (min_tokens, train_tokens): its chosen row
            out["input_ids"] = list(out["chosen_input_ids"])
        return out

    return encode, None


class Batches:
    """Pads encoded rows into batches the model can run (the merge check, `eval_loss`): pairs as their chosen rows
    then their rejected rows; labelled rows as they are (training adds KTO's mismatched rows: `training`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from tasks.objectives.preference.encode import PairCollator, padded

        if "chosen_input_ids" in features[0]:
            return PairCollator(self.pad)(features)
        return padded([f["input_ids"] for f in features], [f["labels"] for f in features], self.pad)


def collator(tokenizer: Any) -> Batches:
    return Batches(tokenizer)


def full_collator(tokenizer: Any, options: Mapping[str, Any]) -> Any:
    """What the loss reads: pairs, or labelled rows with KTO's mismatched rows cut to the run's max_length."""
    from tasks.objectives.preference.encode import collator as preference_collator

    return preference_collator(tokenizer, bool(options.get("paired", True)), int(options.get("max_length", 1 << 30)))


def has_adapter_switch(model: nn.Module) -> bool:
    from tasks.objectives.preference.train import unwrapped

    return hasattr(unwrapped(model), "disable_adapter")


def the_base_itself(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """The reference of a model that is its own reference (the untouched base)."""
    return contextlib.nullcontext()


def training(
    settings: Mapping[str, Any], model: nn.Module, tokenizer: Any, starting: Callable[[], nn.Module]
) -> OwnTraining:
    """The preference loss for the Trainer: the reference is the policy with its adapter disabled, else a frozen
    copy of the model training starts from (`starting`)."""
    from tasks.objectives.preference.train import PreferenceLoss, PreferenceTrainerMixin, Reference

    loss = loss_settings(dict(settings))
    reference = None
    if loss.uses_reference:
        reference = Reference() if has_adapter_switch(model) else Reference(frozen=starting())
    return OwnTraining(
        mixin=PreferenceTrainerMixin,
        kwargs={"preference": PreferenceLoss(loss, reference)},
        collator=full_collator(tokenizer, settings),
    )


def shape(config: RunConfig, model: nn.Module) -> TrainingShape:
    """A pair puts its chosen and its rejected row through the policy with gradients (kto: one row; its
    mismatched row runs under no_grad); a loss with a reference holds a frozen copy of the starting model when
    the method has no adapter to switch off (full, the bottleneck adapter)."""
    settings = section(config)
    frozen = settings.uses_reference and not has_adapter_switch(model)
    return TrainingShape(sequences=1 if settings.loss == "kto" else 2, frozen_copy=frozen)


def eval_reference(model: nn.Module, tokenized: TokenizedRef) -> Reference | None:
    """Evaluation's reference: the adapter disabled, else the untouched base (loaded from the run's model
    settings)."""
    from tasks.modeling import resolve_model
    from tasks.objectives.preference.train import Reference
    from tasks.settings import ModelSettings

    if not loss_settings(tokenized.options).uses_reference:
        return None
    if has_adapter_switch(model):
        return Reference()
    source = resolve_model(ModelSettings.model_validate(tokenized.options["model"]))
    base, _ = causal_lm.base_model(tokenized.model_source(source))
    return Reference(frozen=base)


def preference_loss(tokenized: TokenizedRef, reference: Reference | None) -> PreferenceLoss:
    from tasks.objectives.preference.train import PreferenceLoss

    return PreferenceLoss(loss_settings(tokenized.options), reference)


def metrics(
    model: nn.Module, tokenizer: Any, tokenized: TokenizedRef, batch_size: int, keep: Path | None
) -> dict[str, float]:
    """The preference loss, reward accuracy and margin, log-probs and pair accuracy on the held-out rows."""
    from tasks.objectives.preference.train import evaluate_preferences

    _, eval_split = tokenized.splits()
    loss = preference_loss(tokenized, eval_reference(model, tokenized))
    return evaluate_preferences(model, eval_split, full_collator(tokenizer, tokenized.options), batch_size, loss)


BASE_KEPT = ("base_eval_loss", "base_eval_pair_accuracy", "base_eval_logps_chosen", "base_eval_logps_rejected")


def base_metrics(source: ModelSource, tokenized: TokenizedRef, batch_size: int) -> dict[str, float]:
    """The untouched base on the same rows, as its own reference: its pair accuracy compares with the tuned
    model's directly (its rewards are zero by construction and are left out)."""
    from tasks.objectives.preference.train import Reference, evaluate_preferences

    model, tokenizer = instruction.base_model(source, tokenized)
    loss = preference_loss(tokenized, Reference(disabled=the_base_itself))
    collate = full_collator(tokenizer, tokenized.options)
    _, eval_split = tokenized.splits()
    result = evaluate_preferences(model, eval_split, collate, batch_size, loss, prefix="base_eval_")
    return {k: v for k, v in result.items() if k in BASE_KEPT}


def eval_loss(model: nn.Module, dataset: Dataset, collate: Any, batch_size: int) -> float:
    """Mean NLL per response token of the held-out rows (chosen and rejected): a loss any model has, without a
    reference (what a lossy merge is checked with)."""
    return causal_lm.eval_loss(model, dataset, collate, batch_size)


REPORT_PAIRS = 256  # held-out pairs compared tuned vs base in the report


def held_out_pairs(
    data: DataRef, tokenized: TokenizedRef, tokenizer: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first held-out pairs that training would keep, as messages and encoded (aligned; none for unpaired
    rows)."""
    from tasks.objectives.preference.encode import encode_pair

    if not tokenized.options.get("paired", True):
        return [], []
    template = instruction.template_of(tokenizer, tokenized.options)
    max_length = int(tokenized.options["max_length"])
    rows, encoded = [], []
    for row in data.splits()[1]:
        pair = encode_pair(row, tokenizer, template, max_length)
        if pair is not None:
            rows.append(row)
            encoded.append(pair)
            if len(rows) == REPORT_PAIRS:
                break
    return rows, encoded


def pair_margins(model: nn.Module, tokenizer: Any, encoded: Sequence[dict[str, Any]], batch_size: int) -> list[float]:
    """logp(chosen) - logp(rejected) per pair (summed over each response's tokens)."""
    import torch

    from tasks.objectives.preference.encode import PairCollator
    from tasks.objectives.preference.train import sequence_logps

    collate = PairCollator(Batches(tokenizer).pad)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = {k: v.to(device) for k, v in collate(list(encoded[start : start + batch_size])).items()}
                logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
                chosen, rejected = logps.split(logps.shape[0] // 2)
                out += (chosen - rejected).float().cpu().tolist()
    finally:
        model.train(was_training)
    return out


def base_generations(source: ModelSource, data: DataRef, tokenized: TokenizedRef) -> list[str]:
    """The base model's part of the report: its margin logp(chosen) - logp(rejected) on each held-out pair the
    report compares (as text: the record's type for what the base contributes)."""
    from tasks.measuring import EVAL_BATCH_SIZE

    model, tokenizer = instruction.base_model(source, tokenized)
    _, encoded = held_out_pairs(data, tokenized, tokenizer)
    return [repr(m) for m in pair_margins(model, tokenizer, encoded, EVAL_BATCH_SIZE)]


def _text(messages: Sequence[Mapping[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def report(given: ReportInput) -> tuple[dict[str, Any], dict[str, float]]:
    """The metrics tuned vs base; the held-out pairs whose preference flipped between the base and the tuned model
    (by logp(chosen) - logp(rejected)), with a plot of both margins (`reports/reward_margins.png`)."""
    metric_keys = metric_names_of(given.tokenized)
    sections: dict[str, Any] = {
        "metrics": {key: (given.metrics.get(key), given.metrics.get(f"base_{key}")) for key in metric_keys}
    }
    rows, encoded = held_out_pairs(given.data, given.tokenized, given.tokenizer)
    if not rows:
        return sections, {}
    tuned = pair_margins(given.model, given.tokenizer, encoded, given.batch_size)
    base = [float(m) for m in given.base_texts]
    flipped = [
        {"prompt": _text(row["prompt"]), "chosen": _text(row["chosen"]), "rejected": _text(row["rejected"]),
         "base_margin": b, "tuned_margin": t, "now": "chosen" if t > 0 else "rejected"}
        for row, b, t in zip(rows, base, tuned, strict=True)
        if (b > 0) != (t > 0)
    ]  # fmt: skip
    to_chosen = sum(1 for f in flipped if f["now"] == "chosen")
    sections["flipped"] = {
        "pairs": len(rows),
        "to_chosen": to_chosen,
        "to_rejected": len(flipped) - to_chosen,
        "examples": flipped[:REPORTED],
    }
    plot_margins(base, tuned, given.folder / PLOT)
    sections["plot"] = PLOT
    return sections, {
        "report_flipped_to_chosen": float(to_chosen),
        "report_flipped_to_rejected": float(len(flipped) - to_chosen),
    }


def metric_names_of(tokenized: TokenizedRef) -> tuple[str, ...]:
    from tasks.objectives.preference.train import metric_names as names

    return names(loss_settings(tokenized.options).loss)


def plot_margins(base: list[float], tuned: list[float], path: Path) -> None:
    """Each held-out pair's margin logp(chosen) - logp(rejected), base against tuned: above the diagonal, training
    moved it towards the chosen response; right of zero, the tuned model prefers it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5))
    axes.scatter(base, tuned, s=12)
    low, high = min(base + tuned + [0.0]), max(base + tuned + [0.0])
    axes.plot([low, high], [low, high], color="grey", linewidth=0.8)
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.axvline(0, color="grey", linewidth=0.5)
    axes.set_xlabel("base: logp(chosen) - logp(rejected)")
    axes.set_ylabel("tuned: logp(chosen) - logp(rejected)")
    axes.set_title("held-out pairs: reward margin, base vs tuned")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


OBJECTIVE = Objective(
    name="preference",
    summary="Preference tuning (DPO, IPO, hinge, SimPO, ORPO, KTO) on chat pairs; reward and pair accuracy vs the base",
    encoder=encoder,
    collator=collator,
    head=CAUSAL_LM,
    section="preference",
    settings=PreferenceSection,
    row_layout=PreferenceDataSettings,
    metrics=metrics,
    eval_loss=eval_loss,
    base_metrics=base_metrics,
    report=report,
    report_metrics=("report_flipped_to_chosen", "report_flipped_to_rejected"),
    probe=instruction.probe,
    probes_base=True,
    prepare_rows=prepare_rows,
    min_tokens=2,
    base_generations=base_generations,
    options=options,
    row_column="prompt",
    data_key=row_layout_key,
    metric_names=metric_names,
    files=files,
    check=check,
    token_loss=False,
    packing_problem="preference pairs are scored whole, one row per response; packing would merge them",
    training=training,
    shape=shape,
    grid_dimensions=(
        GridDimension("beta", Annotated[float, Field(gt=0)], "values of preference.beta, one trial each"),
        GridDimension("loss", LossName, "values of preference.loss, one trial each (all pair losses, or kto)"),
    ),
)
