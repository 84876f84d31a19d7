"""What the peft-backed methods share: save, load onto a fresh base, merge, target-module checks."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from torch import nn

from tasks.errors import UserInputError

ALL_LINEAR = "all-linear"
# Output layers are never adapted: they map to the vocabulary or the labels.
_OUTPUT_LAYERS = {"lm_head", "score", "classifier"}


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the model's linear layers, output layers excluded (`q_proj`, ...)."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, nn.Linear) or module.__class__.__name__ in {"Linear4bit", "Linear8bitLt"}:
            leaf = full_name.rsplit(".", 1)[-1]
            if leaf not in _OUTPUT_LAYERS:
                names.add(leaf)
    return sorted(names)


def resolve_target_modules(model: nn.Module, requested: list[str] | str, key: str) -> list[str]:
    """Check the requested module names against the model; `all-linear` means every linear layer.

    Raises:
        UserInputError: a requested name is not a linear layer of this model (the message lists them).
    """
    available = linear_module_names(model)
    if requested == ALL_LINEAR:
        return available
    names = [requested] if isinstance(requested, str) else list(requested)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UserInputError(
            f"{key}: {', '.join(repr(n) for n in unknown)} is not a linear module of this model; "
            f"its linear modules are: {', '.join(available)} (or use 'all-linear')"
        )
    return names


def save_peft(model: nn.Module, directory: Path) -> None:
    """Adapter weights as safetensors plus adapter_config.json."""
    assert isinstance(model, PeftModel)
    model.save_pretrained(str(directory), safe_serialization=True)


def load_peft(base: nn.Module, directory: Path, trainable: bool) -> nn.Module:
    """The saved adapter on a fresh base model."""
    return PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)


def merge_peft(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and drop the peft wrappers."""
    assert isinstance(model, PeftModel)
    return model.merge_and_unload()
