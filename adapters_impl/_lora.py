"""What LoRA does to a model (peft); its settings and rules are in lora.py. DoRA and QLoRA reuse `lora_config`."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from torch import nn

from adapters_impl._peft import peft_task, resolve_target_modules
from adapters_impl.base import ApplyContext
from adapters_impl.lora import LoraSettings, LowRankSettings


def lora_config(settings: LowRankSettings, model: nn.Module, context: ApplyContext, use_dora: bool) -> LoraConfig:
    """The peft LoraConfig for these settings, with target modules checked against the model; the rows a chat
    template added train as peft's trainable tokens (only those rows are trained and saved; peft ties them into a
    tied output layer)."""
    targets = resolve_target_modules(model, settings.target_modules, "method.target_modules")
    rows = {name: list(ids) for name, ids in context.new_token_rows.items()}
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type=peft_task(model),
        use_dora=use_dora,
        trainable_token_indices=rows or None,
    )


def apply(model: nn.Module, settings: LoraSettings, context: ApplyContext) -> nn.Module:
    """Wrap the model with LoRA; only the LoRA matrices (and a classification head) train."""
    return get_peft_model(model, lora_config(settings, model, context, use_dora=False))  # type: ignore[arg-type]
