"""Adaptation methods, registered by name. A new method = one module + one line in METHODS.

A method's module holds its settings and rules and imports neither torch nor peft (a config is checked before
they load); what it does to a model lives in `_<method>.py`, imported when it runs (`base.Deferred`).
"""

from __future__ import annotations

import dataclasses
from functools import partial

from adapters_impl import adapter, dora, full, head, ia3, lora, prefix, prompt, qlora
from adapters_impl.base import (
    ApplyContext,
    Deferred,
    Method,
    MethodSettings,
    MethodSettingsError,
    count_parameters,
)


def with_token_rows(method: Method) -> Method:
    """`method` with trainable rows for the tokens a chat template added around its own steps (_token_rows.py)."""
    rows = "adapters_impl._token_rows"
    return dataclasses.replace(
        method,
        apply=partial(Deferred(rows, "apply"), method.apply),
        save=partial(Deferred(rows, "save"), method.save),
        load=partial(Deferred(rows, "load"), method.load),
        merge=None if method.merge is None else partial(Deferred(rows, "merge"), method.merge),
        trains_new_tokens=True,
    )


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
    "with_token_rows",
]
