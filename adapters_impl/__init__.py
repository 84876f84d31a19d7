"""Adaptation methods, registered by name. A new method = one module + one line in METHODS."""

from __future__ import annotations

from adapters_impl import lora
from adapters_impl.base import Method, MethodSettings, TaskName, count_parameters

METHODS: dict[str, Method] = {m.name: m for m in (lora.METHOD,)}


def get_method(name: str) -> Method:
    """The registered method called `name` (config validation has already checked it exists)."""
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodSettings", "TaskName", "count_parameters", "get_method"]
