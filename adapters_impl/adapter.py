"""Houlsby bottleneck adapters after the attention and the MLP block of every decoder layer (our own; peft has
none): their settings and rules. What they do to a model: _adapter.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters_impl.base import Deferred, Method, MethodSettings

Location = Literal["attention", "mlp"]
LOCATIONS: tuple[Location, ...] = ("attention", "mlp")


class AdapterSettings(MethodSettings):
    name: Literal["adapter"] = "adapter"
    bottleneck_size: int = Field(16, gt=0, description="width of the bottleneck (down-projection size)")
    activation: Literal["gelu", "relu", "silu", "tanh"] = Field("gelu", description="non-linearity in the bottleneck")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout inside the bottleneck")
    locations: list[Location] = Field(
        default_factory=lambda: list(LOCATIONS), min_length=1, description="which blocks get an adapter"
    )


METHOD = Method(
    name="adapter",
    summary="Bottleneck adapters (Houlsby) after attention and MLP in every layer; adapter-only (not mergeable)",
    settings=AdapterSettings,
    apply=Deferred("adapters_impl._adapter", "apply"),
    save=Deferred("adapters_impl._adapter", "save"),
    load=Deferred("adapters_impl._adapter", "load"),
    merge=None,
)
