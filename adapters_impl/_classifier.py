"""A classifier over a decoder's hidden states, pooled on the last attended token, for prefix and prompt tuning.

HF's sequence classifiers do not work with them: prefix tuning needs past key values, which they refuse, and with
prompt tuning (inputs given as embeddings) they cannot see the padding and pool the last position, a pad token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


def last_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last position with mask 1: right or left padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


class LastTokenClassifier(nn.Module):
    """`score(hidden state of the last real token)`, with the backbone's virtual tokens skipped."""

    def __init__(self, backbone: nn.Module, score: nn.Module, config: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.score = score
        self.config = config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden[:, -input_ids.shape[1] :]  # virtual tokens, when any, come first
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        logits = self.score(hidden[rows, last_attended(attention_mask)])
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
