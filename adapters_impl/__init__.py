"""Adaptation methods, registered by name. A new method = one module + one line in METHODS."""

from __future__ import annotations

from adapters_impl import adapter, dora, full, head, ia3, lora, prefix, prompt, qlora
from adapters_impl._token_rows import with_token_rows
from adapters_impl.base import ApplyContext, Method, MethodSettings, MethodSettingsError, count_parameters

# Methods that cannot train the embedding rows of tokens a chat template added get adaptflow's own (_token_rows).
METHODS: dict[str, Method] = {
    m.name: m if m.trains_new_tokens else with_token_rows(m)
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
    "count_parameters",
    "get_method",
]
