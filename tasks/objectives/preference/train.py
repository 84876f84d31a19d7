"""Training and evaluation of preference losses with the HF Trainer.

`PreferenceLoss(settings, reference)` computes a batch's loss and its logged numbers from one forward of the
policy over the chosen and rejected rows together (and, for the DPO family and KTO, one forward of the reference
under no_grad). The reference is a `Reference`: the policy itself with its adapter disabled (peft's
`disable_adapter()`: no second copy in memory), or a frozen copy (method `full`).

`PreferenceTrainerMixin` puts it into an HF Trainer subclass (`class T(PreferenceTrainerMixin, MethodTrainer)`):
its `compute_loss`, the columns the Trainer keeps, and the numbers logged with the loss (`rewards/accuracies`,
`rewards/margins`, `rewards/chosen`, `rewards/rejected`, `logps/chosen`, `logps/rejected`, kto's `kl`), averaged
over each logging interval and read on the host only when logged.

`evaluate_preferences(model, rows, collator, batch_size, loss, prefix)`: the eval metrics on held-out rows.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.labels import IGNORE_INDEX
from tasks.objectives.preference.encode import PAIR_COLUMNS, UNPAIRED_COLUMNS
from tasks.objectives.preference.losses import (
    LossOutput,
    PairLogps,
    PreferenceSettings,
    kto_kl,
    kto_loss,
    pair_loss,
)


@dataclass(frozen=True)
class SequenceLogps:
    """Per row: the summed log-prob of its labelled tokens, their count, and the summed NLL (= -logps)."""

    logps: torch.Tensor
    tokens: torch.Tensor


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM under any wrapper (DDP, peft) projects only its last positions when asked
    (`logits_to_keep`, transformers' causal LMs)."""
    inner = unwrapped(model)
    base_model = getattr(inner, "get_base_model", None)  # peft's
    if callable(base_model):
        inner = base_model()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def sequence_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> SequenceLogps:
    """Summed log-probs of each row's labelled tokens under `model` (position t predicts token t+1). Prompt-learning
    methods prepend virtual tokens to the logits: the last positions are the rows' own.

    Only the positions from the batch's earliest labelled token on go through the LM head (`logits_to_keep`): the
    shared prompt tokens before it need no logits, which spares the vocabulary-wide projection and log-softmax there
    (as TRL's fused LM head does)."""
    length = input_ids.shape[1]
    keep = length
    if _takes_logits_to_keep(model):
        # The first column of the shifted targets with a label in any row (0 when none has one: keep all).
        keep = length - int(labels[:, 1:].ne(IGNORE_INDEX).any(0).int().argmax())
    kwargs = {"logits_to_keep": keep} if keep < length else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    logits = logits[:, -keep:][:, :-1]
    targets = labels[:, length - keep + 1 :]
    per_token = -F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    return SequenceLogps(per_token.sum(-1), targets.ne(IGNORE_INDEX).sum(-1))


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP's (or accelerate's) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class Reference:
    """Where the reference log-probs come from: `frozen` (a copy of the starting model, never trained), else the
    policy under `disabled(policy)` (default: peft's `disable_adapter()`)."""

    def __init__(
        self,
        frozen: nn.Module | None = None,
        disabled: Callable[[nn.Module], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.frozen = frozen
        self.disabled = disabled or peft_disabled
        if frozen is not None:
            frozen.eval()
            frozen.requires_grad_(False)

    @contextlib.contextmanager
    def model(self, policy: nn.Module) -> Iterator[nn.Module]:
        """The reference model to run (under no_grad, in eval mode: no dropout)."""
        if self.frozen is not None:
            device = next(policy.parameters()).device  # the Trainer moved the policy, not this copy
            if next(self.frozen.parameters()).device != device:
                self.frozen.to(device)
            with torch.no_grad():
                yield self.frozen
            return
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), self.disabled(unwrapped(policy)):
                yield policy
        finally:
            policy.train(was_training)


def peft_disabled(model: nn.Module) -> AbstractContextManager[Any]:
    """peft's adapter-off context. Raises TypeError for a model without one (use a frozen reference)."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise TypeError(
            f"{type(model).__name__} has no disable_adapter(): give the reference as a frozen model copy, or a "
            "context that turns the method off"
        )
    return disable()


def _mean(values: torch.Tensor) -> torch.Tensor:
    return values.float().mean() if values.numel() else values.new_zeros(()).float()


class PreferenceLoss:
    """A batch's preference loss and its logged numbers (detached tensors, read on the host when logged)."""

    def __init__(self, settings: PreferenceSettings, reference: Reference | None = None) -> None:
        if settings.uses_reference and reference is None:
            raise ValueError(f"loss {settings.loss} needs a reference model")
        self.settings = settings
        self.reference = reference

    @property
    def columns(self) -> tuple[str, ...]:
        """The dataset columns the collator reads (the Trainer must keep them)."""
        return UNPAIRED_COLUMNS if self.settings.loss == "kto" else PAIR_COLUMNS

    def _reference_logps(self, model: nn.Module, *batches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        assert self.reference is not None
        with self.reference.model(model) as ref:
            return [sequence_logps(ref, b["input_ids"], b["attention_mask"], b["labels"]).logps for b in batches]

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[LossOutput, dict[str, torch.Tensor]]:
        """The loss and the numbers to log: rewards/accuracies, rewards/margins, rewards/chosen, rewards/rejected,
        logps/chosen, logps/rejected (summed log-probs of the responses), and the loss's extras."""
        if self.settings.loss == "kto":
            return self._kto(model, batch)
        policy = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        pairs = policy.logps.shape[0] // 2
        chosen, rejected = policy.logps.split(pairs)
        chosen_tokens, rejected_tokens = policy.tokens.split(pairs)
        ref_chosen = ref_rejected = nll = None
        if self.settings.uses_reference:
            (ref,) = self._reference_logps(model, batch)
            ref_chosen, ref_rejected = ref.split(pairs)
        if self.settings.loss == "orpo":
            nll = -chosen.sum() / chosen_tokens.sum().clamp(min=1)  # token mean over the batch's chosen responses
        out = pair_loss(
            self.settings, PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected, nll)
        )
        numbers = {
            "rewards/chosen": _mean(out.chosen_rewards),
            "rewards/rejected": _mean(out.rejected_rewards),
            "rewards/accuracies": _mean(out.chosen_rewards > out.rejected_rewards),
            "rewards/margins": _mean(out.chosen_rewards - out.rejected_rewards),
            "logps/chosen": _mean(chosen.detach()),
            "logps/rejected": _mean(rejected.detach()),
            "pair_accuracy": _mean(chosen.detach() > rejected.detach()),
            **{k: v.detach().float() for k, v in out.extra.items()},
        }
        return out, numbers

    def _kto(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[LossOutput, dict[str, torch.Tensor]]:
        main = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        mismatched = {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "labels")}
        policy = sequence_logps(model, **main).logps
        with torch.no_grad():
            policy_kl = sequence_logps(model, **mismatched).logps
        ref, ref_kl = self._reference_logps(model, main, mismatched)
        labels = batch["label"].bool()
        out = kto_loss(self.settings, policy, ref, labels, kto_kl(policy_kl, ref_kl))
        chosen, rejected = policy.detach()[labels], policy.detach()[~labels]
        numbers = {
            "rewards/chosen": _mean(out.chosen_rewards),
            "rewards/rejected": _mean(out.rejected_rewards),
            "rewards/margins": _mean(out.chosen_rewards) - _mean(out.rejected_rewards),
            "logps/chosen": _mean(chosen),
            "logps/rejected": _mean(rejected),
            "label_accuracy": _mean(_label_hits(policy.detach() - ref, labels, out.extra["kl"])),
            "kl": out.extra["kl"].float(),
        }
        return out, numbers


def _label_hits(ratio: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """Rows the model judges as labelled: desirable rows above KTO's reference point z, undesirable ones below."""
    return torch.where(labels, ratio > kl, ratio < kl)


class PreferenceTrainerMixin:
    """Mixed into an HF Trainer subclass, before it: `class T(PreferenceTrainerMixin, MethodTrainer)`, built with
    `preference=PreferenceLoss(...)`. The Trainer must not scale the loss by a token count
    (`model_accepts_loss_kwargs = False`: the loss is a mean over pairs)."""

    _signature_columns: list[str] | None

    def __init__(self, *args: Any, preference: PreferenceLoss, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.preference = preference
        self.model_accepts_loss_kwargs = False
        self._pref_logged: dict[str, list[torch.Tensor]] = {}

    def _set_signature_columns_if_needed(self) -> None:
        self._signature_columns = list(self.preference.columns)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        out, numbers = self.preference(model, inputs)
        if model.training:
            for key, value in numbers.items():
                self._pref_logged.setdefault(key, []).append(value)
        return (out.loss, {"losses": out.losses}) if return_outputs else out.loss

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        with torch.no_grad():
            out, _ = self.preference(model, inputs)
        return out.loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._pref_logged:  # a training log: add this interval's means
            logs = logs | {k: float(torch.stack(v).mean()) for k, v in self._pref_logged.items()}
            self._pref_logged = {}
        super().log(logs, start_time)  # type: ignore[misc]


PAIR_METRICS = (
    "eval_loss",
    "eval_reward_accuracy",
    "eval_reward_margin",
    "eval_logps_chosen",
    "eval_logps_rejected",
    "eval_pair_accuracy",
)
UNPAIRED_METRICS = (
    "eval_loss",
    "eval_label_accuracy",
    "eval_reward_margin",
    "eval_logps_chosen",
    "eval_logps_rejected",
)


def metric_names(loss: str) -> tuple[str, ...]:
    """What `evaluate_preferences` reports for this loss."""
    return UNPAIRED_METRICS if loss == "kto" else PAIR_METRICS


@torch.no_grad()
def evaluate_preferences(
    model: nn.Module,
    rows: Sequence[dict[str, Any]],
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    loss: PreferenceLoss,
    prefix: str = "eval_",
) -> dict[str, float]:
    """The preference metrics of `model` on encoded held-out rows (in eval mode; training mode restored).

    Pairs: `eval_loss` (the preference loss, mean over pairs), `eval_reward_accuracy` (share of pairs whose chosen
    reward beats the rejected one), `eval_reward_margin`, `eval_logps_chosen`, `eval_logps_rejected` (mean summed
    log-probs), `eval_pair_accuracy` (share of pairs with logp(chosen) > logp(rejected): needs no reference, so the
    base and the tuned model compare directly). KTO: loss, `eval_label_accuracy` (rows on the side of the reference
    point their label says), margin, logps. With `prefix="base_eval_"` for the untouched base model.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    device = next(model.parameters()).device
    try:
        for start in range(0, len(rows), batch_size):
            features = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]  # a list or a Dataset
            batch = {k: v.to(device) for k, v in collator(features).items()}
            out, numbers = loss(model, batch)
            size = len(features)
            numbers = numbers | {"loss": out.loss.float()}
            for key, value in numbers.items():
                sums[key] = sums.get(key, 0.0) + float(value) * size
            count += size
    finally:
        model.train(was_training)
    mean = {key: value / max(count, 1) for key, value in sums.items()}
    names = {
        "loss": "loss",
        "rewards/margins": "reward_margin",
        "logps/chosen": "logps_chosen",
        "logps/rejected": "logps_rejected",
        **({"label_accuracy": "label_accuracy"} if loss.settings.loss == "kto"
           else {"rewards/accuracies": "reward_accuracy", "pair_accuracy": "pair_accuracy"}),
    }  # fmt: skip
    return {f"{prefix}{name}": mean[key] for key, name in names.items()}
