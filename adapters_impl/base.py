"""The one small interface every adaptation method implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict
from torch import nn

TaskName = Literal["causal_lm", "classification"]


class MethodSettings(BaseModel):
    """Settings common to every method; each method subclasses this with a literal `name`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str


class ApplyFn(Protocol):
    def __call__(self, model: nn.Module, settings: Any, task: TaskName) -> nn.Module: ...


class SaveFn(Protocol):
    def __call__(self, model: nn.Module, directory: Path) -> None: ...


class LoadFn(Protocol):
    def __call__(self, base: nn.Module, directory: Path, trainable: bool) -> nn.Module: ...


class MergeFn(Protocol):
    def __call__(self, model: nn.Module) -> nn.Module: ...


@dataclass(frozen=True)
class Method:
    """An adaptation method: its settings model and what it does to a base model.

    `merge` is None for methods whose weights cannot be folded into the base (they register adapter-only).
    """

    name: str
    summary: str
    settings: type[MethodSettings]
    tasks: tuple[TaskName, ...]
    apply: ApplyFn
    save: SaveFn
    load: LoadFn
    merge: MergeFn | None

    @property
    def mergeable(self) -> bool:
        return self.merge is not None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        # bitsandbytes packs two 4-bit values per byte: count logical weights, as peft does.
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
