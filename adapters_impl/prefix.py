"""Prefix tuning: trained key/value prefixes in every attention layer (peft); adapter-only, not mergeable. (What it
does: _prefix.py.)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters_impl.base import Deferred, Method, MethodSettings


class PrefixSettings(MethodSettings):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(10, gt=0, description="prefix length per layer")
    projection: bool = Field(False, description="reparametrize the prefix through an MLP (more stable, more weights)")
    projection_hidden_size: int = Field(128, gt=0, description="hidden size of that MLP")


METHOD = Method(
    name="prefix",
    summary="Prefix tuning: trained key/value prefixes in every layer; adapter-only (not mergeable)",
    settings=PrefixSettings,
    apply=Deferred("adapters_impl._prefix", "apply"),
    save=Deferred("adapters_impl._peft", "save_peft"),
    load=Deferred("adapters_impl._peft", "load_peft"),
    merge=None,
    virtual_tokens=True,
    checkpointing_problem=(
        "its virtual keys and values enter every layer as a cache, which checkpointed layers drop; set it to false "
        "or use prompt or lora"
    ),
)
