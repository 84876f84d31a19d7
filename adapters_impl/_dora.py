"""What DoRA does to a model (peft `use_dora`); its settings and rules are in dora.py."""

from __future__ import annotations

from peft import get_peft_model
from torch import nn

from adapters_impl._lora import lora_config
from adapters_impl.base import ApplyContext
from adapters_impl.dora import DoraSettings


def apply(model: nn.Module, settings: DoraSettings, context: ApplyContext) -> nn.Module:
    """LoRA with weight decomposition: magnitude and direction are learned separately."""
    return get_peft_model(model, lora_config(settings, model, context, use_dora=True))  # type: ignore[arg-type]
