"""Adaptation methods, registered by name. A new method = one module + one line in METHODS."""

from __future__ import annotations

from adapters_impl import adapter, dora, full, head, ia3, lora, prefix, prompt, qlora
from adapters_impl.base import ApplyContext, Method, MethodSettings, MethodSettingsError, TaskName, count_parameters

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        full.METHOD,
        head.METHOD,
        lora.METHOD,
        dora.METHOD,
        qlora.METHOD,
        ia3.METHOD,
        adapter.METHOD,
        prefix.METHOD,
        prompt.METHOD,
    )
}


def get_method(name: str) -> Method:
    """The registered method called `name` (config validation has already checked it exists)."""
    return METHODS[name]


__all__ = [
    "METHODS",
    "ApplyContext",
    "Method",
    "MethodSettings",
    "MethodSettingsError",
    "TaskName",
    "count_parameters",
    "get_method",
]
