"""LoRA: trainable low-rank updates on chosen linear layers (peft). DoRA and QLoRA reuse this module."""

from __future__ import annotations

from typing import Literal

from peft import LoraConfig, get_peft_model
from pydantic import Field
from torch import nn

from adapters_impl._peft import ALL_LINEAR, load_peft, merge_peft, peft_task, resolve_target_modules, save_peft
from adapters_impl.base import ApplyContext, Method, MethodSettings


class LowRankSettings(MethodSettings):
    """The settings LoRA, DoRA and QLoRA share; `alpha / r` scales the update."""

    r: int = Field(8, gt=0, description="rank of the update matrices")
    alpha: float = Field(16, gt=0, description="scaling numerator (lora_alpha)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="linear layer names to adapt, or 'all-linear'",
    )


class LoraSettings(LowRankSettings):
    name: Literal["lora"] = "lora"


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


METHOD = Method(
    name="lora",
    summary="LoRA: low-rank updates on linear layers; merges exactly into the base",
    settings=LoraSettings,
    apply=apply,
    save=save_peft,
    load=load_peft,
    merge=merge_peft,
    trains_new_tokens=True,
    fsdp=True,
    lora_weights="lora",
    lighter=({"method.name": "qlora"},),
)

__all__ = ["ALL_LINEAR", "METHOD", "LoraSettings", "LowRankSettings", "apply", "lora_config"]
