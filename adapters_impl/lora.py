"""LoRA: trainable low-rank updates on chosen linear layers (peft)."""

from __future__ import annotations

from typing import Literal

from peft import LoraConfig, TaskType, get_peft_model
from pydantic import Field
from torch import nn

from adapters_impl._peft import ALL_LINEAR, load_peft, merge_peft, resolve_target_modules, save_peft
from adapters_impl.base import Method, MethodSettings, TaskName

PEFT_TASK = {"causal_lm": TaskType.CAUSAL_LM, "classification": TaskType.SEQ_CLS}


class LoraSettings(MethodSettings):
    """LoRA settings; `alpha / r` scales the update."""

    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="rank of the update matrices")
    alpha: float = Field(16, gt=0, description="scaling numerator (lora_alpha)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="linear layer names to adapt, or 'all-linear'",
    )


def lora_config(settings: LoraSettings, model: nn.Module, task: TaskName, use_dora: bool = False) -> LoraConfig:
    """The peft LoraConfig for these settings, with target modules checked against the model."""
    targets = resolve_target_modules(model, settings.target_modules, "method.target_modules")
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type=PEFT_TASK[task],
        use_dora=use_dora,
    )


def apply(model: nn.Module, settings: LoraSettings, task: TaskName) -> nn.Module:
    """Wrap the model with LoRA; only the LoRA matrices (and a classification head) train."""
    return get_peft_model(model, lora_config(settings, model, task))


METHOD = Method(
    name="lora",
    summary="LoRA: low-rank updates on linear layers; merges exactly into the base",
    settings=LoraSettings,
    tasks=("causal_lm", "classification"),
    apply=apply,
    save=save_peft,
    load=load_peft,
    merge=merge_peft,
)

__all__ = ["ALL_LINEAR", "METHOD", "LoraSettings", "apply"]
