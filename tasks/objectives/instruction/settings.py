"""Task instruction's settings: the `instruction:` section, and the row formats its `data:` keys name."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, field_validator

from tasks.settings import RowLayout, Section

# The columns each format needs (required) and may have (optional), in their canonical names.
REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {"alpaca": ("input", "system")}
CANONICAL = sorted({c for cols in (*REQUIRED.values(), *OPTIONAL.values()) for c in cols})

LossOn = Literal["assistant", "last", "all"]


class ChatTemplateChoice(Section):
    """The chat template a chat objective renders its rows with (its section's `template`), shared by every
    objective that reads conversations (instruction, preference)."""

    template: str = Field(
        "tokenizer",
        description="tokenizer (its chat template, else plain) | plain | chatml | a path to a .jinja file",
    )

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value in ("tokenizer", "plain", "chatml") or value.endswith(".jinja"):
            return value
        raise ValueError(f"expected tokenizer, plain, chatml or a path ending in .jinja, got {value!r}")

    def with_paths(self, resolve: Callable[[str], str]) -> Self:
        """A template file named relative to the config, made absolute by `resolve`."""
        if not self.template.endswith(".jinja"):
            return self
        return self.model_copy(update={"template": resolve(self.template)})

    def template_file(self, key: str) -> dict[str, str]:
        """`key` -> the template file's content fingerprint when `template` names a file (a missing file is
        `template_problems`' to report): an edited file tokenizes, evaluates and registers anew."""
        path = Path(self.template)
        if not self.template.endswith(".jinja") or not path.is_file():
            return {}
        return {key: hashlib.sha256(path.read_bytes()).hexdigest()[:16]}

    def template_problems(self, key: str) -> list[str]:
        """A template file that is missing or empty, named by its config `key` before anything opens."""
        if not self.template.endswith(".jinja"):
            return []
        path = Path(self.template).expanduser()
        if not path.is_file():
            return [f"{key}: file not found: {self.template} (looked up from the working directory, then beside the "
                    "config)"]  # fmt: skip
        if not path.read_text(errors="replace").strip():
            return [f"{key}: {self.template} is empty; it must be a Jinja chat template"]
        return []


class InstructionSettings(ChatTemplateChoice):
    """The `instruction:` section (task instruction)."""

    loss_on: LossOn = Field("assistant", description="assistant: every assistant turn; last: the last one; all")
    eval_generations: int = Field(64, ge=0, description="held-out prompts answered greedily for ROUGE-L/exact match")
    max_new_tokens: int = Field(128, gt=0, description="longest answer generated in evaluation and by predict")


class InstructionDataSettings(RowLayout):
    """The `data:` keys task instruction reads (its row formats), checked against its formats' columns."""

    format: Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt"] = "auto"

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(CANONICAL))
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; the formats' columns are {CANONICAL}")
        for fmt in REQUIRED:  # two of a format's columns read from one file column: every target = its prompt
            readers: dict[str, list[str]] = {}
            for canonical in (*REQUIRED[fmt], *OPTIONAL.get(fmt, ())):
                readers.setdefault(value.get(canonical, canonical), []).append(canonical)
            shared = {column: names for column, names in readers.items() if len(names) > 1}
            if shared:
                column, names = next(iter(shared.items()))
                raise ValueError(
                    f"data.columns: {' and '.join(names)} would both read the file's column {column!r} (format {fmt}); "
                    "map each to a column of its own"
                )
        return value


def section(config: Any) -> InstructionSettings:
    """The run's `instruction:` section, its defaults when absent."""
    return getattr(config, "instruction", None) or InstructionSettings()
