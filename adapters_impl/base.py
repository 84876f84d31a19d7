"""The one small interface every adaptation method implements."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, model_validator

if TYPE_CHECKING:  # the settings and rules import without torch: the config is checked before it loads (~2 s)
    from torch import nn


class MethodSettingsError(ValueError):
    """A method's settings do not fit the model (e.g. a target module it lacks). The message names the key;
    the apply-method stage reports it as the user's input error (exit 2)."""


# Beyond this an integer setting is a typo or an attack: torch and the Trainer overflow on it far from the config.
LARGEST_INT = 2**53


class ConfigSection(BaseModel):
    """A section of the run config: unknown keys refused, frozen, and numbers that are numbers: no inf or nan,
    no `true` for a count (YAML's booleans would pass as 1), no integer beyond 2**53. (A message "@key: ..." names
    the section's key: the config's error report puts the section's path before it.)"""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _plain_numbers(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        numeric = (int, float, int | None, float | None)
        for key, value in values.items():
            field = cls.model_fields.get(key)
            if isinstance(value, bool) and field is not None and field.annotation in numeric:
                raise ValueError(f"@{key}: expected a number, got {str(value).lower()}")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > LARGEST_INT:
                raise ValueError(f"@{key}: {value} is too large (at most {LARGEST_INT})")
        return values


class MethodSettings(ConfigSection):
    """Settings common to every method; each method subclasses this with a literal `name`."""

    name: str


@dataclass(frozen=True)
class ApplyContext:
    """What a method may need besides the model: the objective's name, where the model (and its tokenizer)
    lives, and the embedding rows a chat template added (`new_token_rows`: token ids by module name, the input
    embedding and the output layer unless tied), which the method must train."""

    # The objective's name (config `task:`; its type, `tasks.config.TaskName`, is defined above this layer, which
    # is shipped alone with registered models). Methods only record it: what they need of the objective is the
    # model's output head, and the model itself says which it has (`_weights.is_classifier`).
    task: str
    model_path: str
    new_token_rows: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


class ApplyFn(Protocol):
    def __call__(self, model: nn.Module, settings: Any, context: ApplyContext) -> nn.Module: ...


class SaveFn(Protocol):
    def __call__(self, model: nn.Module, directory: Path) -> None: ...


class LoadFn(Protocol):
    def __call__(self, base: nn.Module, directory: Path, trainable: bool) -> nn.Module: ...


class MergeFn(Protocol):
    """Fold the trained weights into a plain model; `full_precision_base` loads a fresh unquantized base."""

    def __call__(self, model: nn.Module, full_precision_base: Callable[[], nn.Module]) -> nn.Module: ...


@dataclass(frozen=True)
class Deferred:
    """The function `name` of `module`, imported when first called: a method's settings and rules (its module)
    import without torch or peft, so a config is checked before they load; its implementation (`_<method>.py`)
    loads when a model is adapted."""

    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


def no_extra_loading(settings: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    """An adaptation method: its settings model and what it does to a base model.

    `merge` is None for methods whose weights cannot be folded into the base (they register adapter-only).
    `unsupported` maps a model head's kind (`adapters_impl.model_heads`: the kind of model an objective trains) to the
    reason the method cannot train it (shown to the user, exit 2).
    `base_loading` gives extra `from_pretrained` arguments for the base (QLoRA's 4-bit quantization).
    `lossy_merge` marks merges that are not exact, whose quality gap the run measures on the eval set.
    `whole_model`: the saved weights are the whole model (the base itself trains): a version stores them and needs
    no base; every other method's version stores its own weights and a pinned reference to the base.
    `trains_new_tokens`: the method trains the embedding rows of tokens a chat template added
    (`ApplyContext.new_token_rows`) itself; the registry gives the others adaptflow's (`_token_rows`).
    What the method's structure rules out or offers, for the config checks and the memory plan:
    `virtual_tokens`: it prepends trained tokens to every sequence (so packed rows after the first would see them at
    the wrong positions); `fsdp`: it can train with its weights sharded (`train.distributed.strategy: fsdp`), and
    `fsdp_problem` says why not where that is known; `checkpointing_problem`: why activation checkpointing cannot
    work with it (None: it can); `lighter`: settings changes that need less memory, most useful first (the memory
    plan's suggestions beyond batch size and checkpointing); `lora_weights`: its saved weights are a peft LoRA
    adapter ("lora": plain, what llama.cpp and vLLM load as an adapter; "dora": LoRA with a magnitude; None:
    another kind); `quantized_base`: it trains on a quantized base (an export's base is the full-precision one).
    """

    name: str
    summary: str
    settings: type[MethodSettings]
    apply: ApplyFn
    save: SaveFn
    load: LoadFn
    merge: MergeFn | None
    unsupported: Mapping[str, str] = field(default_factory=dict)
    base_loading: Callable[[Any], dict[str, Any]] = no_extra_loading
    lossy_merge: bool = False
    whole_model: bool = False
    trains_new_tokens: bool = False
    virtual_tokens: bool = False
    fsdp: bool = False
    fsdp_problem: str | None = None
    checkpointing_problem: str | None = None
    lighter: tuple[Mapping[str, Any], ...] = ()
    lora_weights: Literal["lora", "dora"] | None = None
    quantized_base: bool = False

    @property
    def mergeable(self) -> bool:
        return self.merge is not None

    @property
    def flow_name(self) -> str:
        """The name of the method's Prefect flow (and of its deployment entrypoint in flows/finetune.py)."""
        return f"{self.name}_finetune"


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
