"""Preference losses from per-sequence log-probabilities, as TRL 1.16 computes them (tests/test_preference_core.py
checks each against TRL's own code on the same log-probs).

Pair losses take the policy's summed log-probs of the chosen and rejected responses, the reference's (DPO family),
the response lengths (IPO, SimPO and ORPO work per token) and, for ORPO, the chosen responses' NLL:

- `sigmoid` (DPO, Rafailov et al. 2023): -log σ(β·((πc - rc) - (πr - rr)));
- `ipo` (Azar et al. 2023): ((πc - rc)/|c| - (πr - rr)/|r| - 1/(2β))², per token as TRL (agreed with the authors);
- `hinge` (SLiC): max(0, 1 - β·((πc - rc) - (πr - rr)));
- `simpo` (Meng et al. 2024, reference-free): -log σ(β·(πc/|c| - πr/|r|) - γ), TRL's CPO `simpo`;
- `orpo` (Hong et al. 2024, reference-free): NLL(chosen) - λ·log σ(log odds(c) - log odds(r)) with per-token
  log-probs; TRL takes the NLL over prompt and response, we over the response only (labels are on responses).

Rewards: β·(π - r) for the DPO family, β·π/|y| for SimPO, λ·π/|y| for ORPO (TRL's). `kto` (Ethayarajh et al. 2024)
takes unpaired rows: desirable 1 - σ(β·(π - r - z)), undesirable 1 - σ(β·(z - (π - r))), weighted, where z is the
batch's KL estimate from mismatched (prompt, completion) pairs, clamped at 0 and not back-propagated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tasks.objectives.preference.settings import REFERENCE_FREE, PreferenceSettings


@dataclass(frozen=True)
class PairLogps:
    """Per-pair numbers a loss reads (each shape (pairs,)); reference ones are None for reference-free losses."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None  # scalar: mean token NLL of the batch's chosen responses (orpo)


@dataclass(frozen=True)
class LossOutput:
    """The batch loss (mean over pairs or rows), the per-pair (or per-row) losses and rewards, and extra numbers."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Mächler 2012); ORPO's log odds need it."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_loss(settings: PreferenceSettings, logps: PairLogps) -> LossOutput:
    """The pair loss `settings.loss` of a batch.

    Raises:
        ValueError: kto (it takes unpaired rows: `kto_loss`), or a reference-based loss without reference log-probs.
    """
    beta, name = settings.beta, settings.loss
    if name in REFERENCE_FREE:
        chosen = logps.chosen / logps.chosen_tokens.clamp(min=1)
        rejected = logps.rejected / logps.rejected_tokens.clamp(min=1)
        if name == "simpo":
            losses = -F.logsigmoid(beta * (chosen - rejected) - settings.gamma)
            return LossOutput(losses.mean(), losses, beta * chosen.detach(), beta * rejected.detach())
        chosen, rejected = chosen.float(), rejected.float()
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        if logps.chosen_nll is None:
            raise ValueError("orpo needs the chosen responses' NLL")
        losses = logps.chosen_nll - settings.lambda_ * ratio
        scale = settings.lambda_
        extra = {"nll_loss": logps.chosen_nll.detach(), "log_odds_ratio": ratio.detach().mean()}
        return LossOutput(losses.mean(), losses, scale * chosen.detach(), scale * rejected.detach(), extra)
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError(f"loss {name} needs the reference model's log-probs")
    chosen_ratio = logps.chosen - logps.ref_chosen
    rejected_ratio = logps.rejected - logps.ref_rejected
    delta = chosen_ratio - rejected_ratio
    if name == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif name == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif name == "ipo":
        chosen_mean = chosen_ratio / logps.chosen_tokens.clamp(min=1)
        rejected_mean = rejected_ratio / logps.rejected_tokens.clamp(min=1)
        losses = (chosen_mean - rejected_mean - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"{name} is not a pair loss")
    return LossOutput(losses.mean(), losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: the batch's mean log-ratio on mismatched pairs, clamped at 0, no gradient."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    settings: PreferenceSettings,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
) -> LossOutput:
    """KTO on unpaired rows: `labels` True for desirable completions. The loss is the mean over the batch's rows,
    desirable rows first in `losses` (TRL's order); rewards β·(π - r) of the desirable and undesirable rows."""
    beta = settings.beta
    labels = labels.bool()
    ratio = logps - ref_logps
    chosen, rejected = ratio[labels], ratio[~labels]
    chosen_losses = 1 - torch.sigmoid(beta * (chosen - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected))
    losses = torch.cat((settings.desirable_weight * chosen_losses, settings.undesirable_weight * rejected_losses))
    return LossOutput(losses.mean(), losses, beta * chosen.detach(), beta * rejected.detach(), {"kl": kl})
