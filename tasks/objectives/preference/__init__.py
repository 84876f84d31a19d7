"""Preference tuning (issue 27): the self-contained core that the `preference` objective wires into the pipeline.
Its names below load (torch, trl) when first used: the objective's settings (settings.py) are read without them.

Modules
    formats  rows in any preference format -> the normal form (`normalize`, `DataOptions`, `loss_format_problem`)
    encode   normal form -> ids with labels on the responses, with the run's chat template (`PreferenceEncoder`,
             `encode_all`, `collator`); over-long rows lose prompt tokens first, unfit rows are counted
    losses   sigmoid (DPO), ipo, hinge, simpo, orpo, kto from per-sequence log-probs (`PreferenceSettings`,
             `pair_loss`, `kto_loss`), tested against TRL's code
    train    `PreferenceLoss` (a batch's loss and logged numbers), `Reference` (adapter disabled, or a frozen copy),
             `PreferenceTrainerMixin` (HF Trainer), `evaluate_preferences` (eval metrics)

What the objective record needs
    settings section `preference:` = `PreferenceSettings`: loss (sigmoid | ipo | hinge | simpo | orpo | kto),
        beta (0.1), gamma (simpo, 0.5), lambda (orpo, 0.1), desirable_weight / undesirable_weight (kto, 1.0).
    data keys: data.format (auto | explicit | implicit | sharegpt | unpaired), data.columns (canonical names:
        prompt, chosen, rejected, conversations, messages, completion, label), data.role_map (sharegpt `from`).
        `DataOptions.problems()` checks them; `loss_format_problem(loss, format)` refuses kto on pairs and a pair
        loss on unpaired rows (exit 2).
    rows: `normalize(...).rows` -> Dataset columns prompt/chosen/rejected (or prompt/completion/label), messages as
        lists of {role, content}; `equal_dropped` pairs (chosen == rejected) are counted.
    template: instruction's (`tasks.objectives.instruction.chat.resolve_template`, the template saved with the model); serving is
        chat, as for instruction (the package records the template: `chat`, `generation`).
    encoding: `PreferenceEncoder(tokenizer, template, max_length, paired)` mapped batched; `.dropped` ->
        metric `pref_dropped_rows`; collator `collator(tokenizer, paired, max_length)`.
    training: `token_loss = False` (mean over pairs); Trainer = `PreferenceTrainerMixin` + MethodTrainer with
        `preference=PreferenceLoss(settings, Reference(...))`; logged `rewards/accuracies`, `rewards/margins`,
        `rewards/chosen`, `rewards/rejected`, `logps/chosen`, `logps/rejected`, `pair_accuracy` (kto: `kl`,
        `label_accuracy`).
    metrics: `metric_names(loss)`: pairs eval_loss, eval_reward_accuracy, eval_reward_margin, eval_logps_chosen,
        eval_logps_rejected, eval_pair_accuracy (+ base_eval_pair_accuracy from the base with prefix
        "base_eval_"); kto eval_loss, eval_label_accuracy, eval_reward_margin, eval_logps_chosen,
        eval_logps_rejected. Prunable: eval_reward_accuracy (max) or eval_loss (min).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.objectives.preference.encode import PreferenceEncoder, collator, encode_all
    from tasks.objectives.preference.formats import DataOptions, Normalized, loss_format_problem, normalize
    from tasks.objectives.preference.losses import PreferenceSettings, kto_loss, pair_loss
    from tasks.objectives.preference.train import (
        PreferenceLoss,
        PreferenceTrainerMixin,
        Reference,
        evaluate_preferences,
        metric_names,
    )

__all__ = [
    "DataOptions",
    "Normalized",
    "PreferenceEncoder",
    "PreferenceLoss",
    "PreferenceSettings",
    "PreferenceTrainerMixin",
    "Reference",
    "collator",
    "encode_all",
    "evaluate_preferences",
    "kto_loss",
    "loss_format_problem",
    "metric_names",
    "normalize",
    "pair_loss",
]


def __getattr__(name: str) -> Any:
    """The core's names, imported on first use (PEP 562); any other name is a submodule or missing."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from tasks.objectives.preference import encode, formats, losses, train

    return next(getattr(m, name) for m in (encode, formats, losses, train) if hasattr(m, name))
