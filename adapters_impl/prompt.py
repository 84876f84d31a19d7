"""Prompt tuning: trained virtual token embeddings before the input (peft); adapter-only, not mergeable. (What it
does: _prompt.py.)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters_impl.base import Deferred, Method, MethodSettings


class PromptSettings(MethodSettings):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(10, gt=0, description="number of virtual tokens")
    init_text: str | None = Field(
        None, description="initialise the virtual tokens from this text's embeddings (null: random)"
    )


METHOD = Method(
    name="prompt",
    summary="Prompt tuning: trained virtual tokens before the input, random or text-initialised; adapter-only",
    settings=PromptSettings,
    apply=Deferred("adapters_impl._prompt", "apply"),
    save=Deferred("adapters_impl._peft", "save_peft"),
    load=Deferred("adapters_impl._peft", "load_peft"),
    merge=None,
    virtual_tokens=True,
)
