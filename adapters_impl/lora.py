"""LoRA: trainable low-rank updates on chosen linear layers (peft). DoRA and QLoRA reuse its settings. (What it
does: _lora.py.)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters_impl.base import Deferred, Method, MethodSettings


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


apply = Deferred("adapters_impl._lora", "apply")

METHOD = Method(
    name="lora",
    summary="LoRA: low-rank updates on linear layers; merges exactly into the base",
    settings=LoraSettings,
    apply=apply,
    save=Deferred("adapters_impl._peft", "save_peft"),
    load=Deferred("adapters_impl._peft", "load_peft"),
    merge=Deferred("adapters_impl._peft", "merge_peft"),
    trains_new_tokens=True,
    fsdp=True,
    lora_weights="lora",
    lighter=({"method.name": "qlora"},),
)

__all__ = ["METHOD", "LoraSettings", "LowRankSettings", "apply"]
